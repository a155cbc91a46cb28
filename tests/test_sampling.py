"""The batched sampler: answers independent of batch neighbours, pinned tokens held, renoising budgeted,
statistics and traces recorded."""

import pytest
from transformers import EntropyBoundSamplerConfig

from dgemma_ft.chat import prompt_ids
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model
from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 head_dim=16, global_head_dim=16, moe_intermediate_size=16,
                                                 sliding_window=6, canvas_length=8, seed=5))
    return model.eval(), tokenizer


def _requests(tokenizer, texts, pinned=None):
    return [Request(prompt_ids=prompt_ids(tokenizer, [{"role": "user", "content": text}]), seed=100 + i,
                    pinned=dict(pinned or {})) for i, text in enumerate(texts)]


def test_batched_and_one_at_a_time_agree(tiny):
    model, tokenizer = tiny
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_model(model, max_new_tokens=24,
                                                                    max_denoising_steps=6))
    requests = _requests(tokenizer, ["a", "a much longer prompt than the first one", "mid length"])
    batched = sampler.generate(requests)
    alone = [sampler.generate([request])[0] for request in requests]
    for together, single in zip(batched, alone):
        assert together.token_ids == single.token_ids
        assert together.forwards == single.forwards and together.blocks == single.blocks
    # a different seed gives a different answer (the seed, not the batch, decides)
    other = sampler.generate([Request(prompt_ids=requests[0].prompt_ids, seed=7)])[0]
    assert other.token_ids != batched[0].token_ids


def test_pinned_tokens_are_never_changed(tiny):
    model, tokenizer = tiny
    digit = tokenizer.convert_tokens_to_ids
    pinned = {0: digit("4"), 3: digit("1"), 9: digit("2"), 15: digit("3")}
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_model(model, max_new_tokens=16,
                                                                    max_denoising_steps=5))
    results = sampler.generate(_requests(tokenizer, ["x", "yy", "zzz"], pinned), pin=True, trace_index=1)
    eos = set(model.generation_config.eos_token_id)
    for result in results:
        for index, token in pinned.items():
            if index < len(result.token_ids):
                assert result.token_ids[index] == token
        assert result.forwards >= 1 and result.steps == result.forwards
        assert all(t not in eos for t in result.token_ids[:-1])
    trace = results[1].trace
    assert trace and all(frame["canvas"][0] == pinned[0] for frame in trace if frame["block"] == 0)
    assert all(frame["pinned"][3] for frame in trace if frame["block"] == 0)


def test_renoising_flags_positions_within_budget(tiny):
    model, tokenizer = tiny
    config = SamplerConfig.from_model(model, max_new_tokens=8, max_denoising_steps=6, renoise_budget=2)
    calls = []

    def always_bad(token_ids):
        calls.append(list(token_ids))
        return [1, 2]

    request = _requests(tokenizer, ["q"])[0]
    request.violations = always_bad
    result = BlockDiffusionSampler(model, config).generate([request], renoise=True)[0]
    assert len(calls) == 2  # the budget caps the checks that renoise
    assert result.renoised == 4
    plain = BlockDiffusionSampler(model, config).generate(_requests(tokenizer, ["q"]), renoise=True)[0]
    assert plain.renoised == 0


def test_max_new_tokens_caps_blocks(tiny):
    model, tokenizer = tiny
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_model(model, max_new_tokens=20,
                                                                    max_denoising_steps=3))
    result = sampler.generate(_requests(tokenizer, ["p"]))[0]
    assert result.blocks <= 3 and len(result.token_ids) <= 24
    assert result.tokens_per_forward == pytest.approx(len(result.token_ids) / result.forwards)


def test_generation_config_defaults_are_read():
    model, _ = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                                         global_head_dim=16, moe_intermediate_size=16))
    model.generation_config.t_min = 0.3
    # not SamplerConfig's default (0.1), so reading the class default instead of the model's would fail here
    model.generation_config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=0.35)
    config = SamplerConfig.from_model(model, max_denoising_steps=9)
    assert config.t_min == 0.3 and config.max_denoising_steps == 9
    assert SamplerConfig().entropy_bound != 0.35 and config.entropy_bound == pytest.approx(0.35)
    assert BlockDiffusionSampler(model, config).eos_ids == set(model.generation_config.eos_token_id)
    # the dict form (sampler_config as generation_config.json stores it) is read too
    model.generation_config.sampler_config = {"entropy_bound": 0.2}
    assert SamplerConfig.from_model(model).entropy_bound == pytest.approx(0.2)
