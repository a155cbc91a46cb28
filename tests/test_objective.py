"""The objective's decoder must compute, block for block, what HF's inference path computes."""

import math

import pytest
import torch
from transformers import DynamicCache

from dgemma_ft.finetune.data import BlockCollator, as_block_batch, encode_example
from dgemma_ft.finetune.objective import ObjectiveConfig, block_diffusion_loss, corrupt
from dgemma_ft.plumbing import unwrap_model
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model

CANVAS = 8
WINDOW = 6  # shorter than every prefix below, so sliding layers must crop


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model(TinySpec(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                                 head_dim=16, global_head_dim=16, moe_intermediate_size=32,
                                                 sliding_window=WINDOW, canvas_length=CANVAS, seed=3))
    return model.float().eval(), tokenizer


def _batch(tokenizer, responses):
    rows = [encode_example(tokenizer, [{"role": "user", "content": f"q{i}?"},
                                       {"role": "assistant", "content": text}], CANVAS)
            for i, text in enumerate(responses)]
    return as_block_batch(BlockCollator(tokenizer.pad_token_id)(rows))


def _hf_block_logits(model, clean_prefix, canvas):
    """HF's own inference path: encoder over prompt + earlier clean blocks (default, cropping cache), then the
    decoder with its default mask."""
    cache = DynamicCache(config=model.config.text_config)
    out = model(input_ids=clean_prefix, decoder_input_ids=canvas, past_key_values=cache)
    return out.logits


@pytest.mark.parametrize("selection", ["all", "random"])
def test_training_logits_match_inference_path(tiny, selection):
    model, tokenizer = tiny
    responses = ["abcdefghijklmnopqrstuvw", "0123456789" * 3 + "xyz"]  # 3+ and 5 canvases
    batch = _batch(tokenizer, responses)
    assert int(batch.num_blocks.min()) >= 3
    config = ObjectiveConfig(self_conditioning_p=0.0, ar_weight=0.0, block_selection=selection)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = block_diffusion_loss(model, batch, config, generator=generator, return_logits=True)
    checked = 0
    for row in range(batch.input_ids.shape[0]):
        for k in range(out.block_index.shape[1]):
            if not out.block_valid[row, k]:
                continue
            block = int(out.block_index[row, k])
            start = int(batch.prompt_lengths[row]) + block * CANVAS
            assert start > WINDOW
            expected = _hf_block_logits(model, batch.input_ids[row:row + 1, :start],
                                        out.noisy_canvas[row:row + 1, k])
            torch.testing.assert_close(out.canvas_logits[row, k], expected[0], atol=1e-5, rtol=0)
            checked += 1
    assert checked == (int(batch.num_blocks.sum()) if selection == "all" else 2)


def test_decoder_reads_the_corrupted_canvas_not_the_clean_response(tiny):
    model, tokenizer = tiny
    batch = _batch(tokenizer, ["abcdefghijklmnopqrst"])
    config = ObjectiveConfig(self_conditioning_p=0.0, ar_weight=0.0, block_selection="all")
    with torch.no_grad():
        out = block_diffusion_loss(model, batch, config, generator=torch.Generator().manual_seed(1),
                                   t_override=1.0, return_logits=True)
    # t = 1: the canvas is pure noise, so it differs from the clean response almost everywhere ...
    assert (out.noisy_canvas != out.clean_canvas).float().mean() > 0.8
    # ... and the logits are those of that noisy canvas: the inference path on the noisy canvas reproduces them,
    # while feeding it the clean canvas gives different logits.
    for k in range(out.block_index.shape[1]):
        start = int(batch.prompt_lengths[0]) + k * CANVAS
        prefix = batch.input_ids[:, :start]
        noisy = _hf_block_logits(model, prefix, out.noisy_canvas[:, k])
        clean = _hf_block_logits(model, prefix, out.clean_canvas[:, k])
        torch.testing.assert_close(out.canvas_logits[0, k], noisy[0], atol=1e-5, rtol=0)
        assert (out.canvas_logits[0, k] - clean[0]).abs().max() > 1e-3


def test_no_block_sees_its_own_or_later_clean_tokens(tiny):
    """Changing the clean tokens of block k (and later) must not change block k's training logits."""
    model, tokenizer = tiny
    batch = _batch(tokenizer, ["abcdefghijklmnopqrstuvw"])
    config = ObjectiveConfig(self_conditioning_p=0.0, ar_weight=0.0, block_selection="all")
    with torch.no_grad():
        base = block_diffusion_loss(model, batch, config, generator=torch.Generator().manual_seed(2),
                                    return_logits=True)
        changed = as_block_batch({"input_ids": batch.input_ids.clone(), "prompt_lengths": batch.prompt_lengths,
                                  "response_lengths": batch.response_lengths, "num_blocks": batch.num_blocks})
        start_last = int(batch.prompt_lengths[0]) + CANVAS * (int(batch.num_blocks[0]) - 1)
        changed.input_ids[0, start_last:] = tokenizer.convert_tokens_to_ids("z")
        again = block_diffusion_loss(model, changed, config, generator=torch.Generator().manual_seed(2),
                                     return_logits=True)
    last = int(batch.num_blocks[0]) - 1
    # same noise draw: the last block's canvas differs only where it was kept clean; compare earlier blocks
    torch.testing.assert_close(base.canvas_logits[0, :last], again.canvas_logits[0, :last], atol=1e-6, rtol=0)


def test_t_limits(tiny):
    model, tokenizer = tiny
    batch = _batch(tokenizer, ["abcdefghijklmnop", "hello world, hello!"])
    clean = batch.input_ids
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(corrupt(clean, torch.zeros(clean.shape[0]), 100, generator), clean)
    noisy = corrupt(clean.repeat(50, 1), torch.ones(clean.shape[0] * 50), 100, generator)
    assert (noisy == clean.repeat(50, 1)).float().mean() < 0.05  # only chance agreement with a random token
    config = ObjectiveConfig(self_conditioning_p=0.0, ar_weight=0.0, block_selection="all")
    with torch.no_grad():
        nearly_clean = block_diffusion_loss(model, batch, config, generator=generator, t_override=0.0)
        pure_noise = block_diffusion_loss(model, batch, config, generator=generator, t_override=1.0)
    assert torch.equal(nearly_clean.noisy_canvas, nearly_clean.clean_canvas)
    assert float(pure_noise.mean_t) == pytest.approx(1.0)
    # sampled t stays in [eps, 1]
    sampled = block_diffusion_loss(model, batch, ObjectiveConfig(eps=0.3, self_conditioning_p=0.0, ar_weight=0.0),
                                   generator=generator)
    assert 0.3 <= float(sampled.mean_t) <= 1.0


def test_loss_terms_and_gradients(tiny):
    model, tokenizer = tiny
    model = model.train()
    batch = _batch(tokenizer, ["abc", "defghijklmnopqrstu"])
    out = block_diffusion_loss(model, batch, ObjectiveConfig(self_conditioning_p=1.0, ar_weight=0.5),
                               generator=torch.Generator().manual_seed(0))
    assert out.ar_loss is not None and math.isfinite(float(out.loss))
    torch.testing.assert_close(out.loss.detach(), out.diffusion_loss + 0.5 * out.ar_loss)
    out.loss.backward()
    base = unwrap_model(model)
    assert base.model.decoder.self_conditioning.gate_proj.weight.grad is not None
    assert base.model.encoder.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()
