"""`dgemma-ft rl`: the likelihood estimate and the clipped objective on a tiny model built in-process (the gradient
follows the advantage, the ratio starts at 1, the reference stays the base), rewards and advantages from the
task's validator, and the driver end to end (run folder, logs, resume)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.data import BlockCollator, as_block_batch, encode_example, end_of_turn_id
from dgemma_ft.finetune.lora import attach_lora
from dgemma_ft.finetune.objective import ObjectiveConfig, block_diffusion_loss
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.rl import rollouts as rollouts_module
from dgemma_ft.finetune.rl.config import RewardWeights, RLConfig
from dgemma_ft.finetune.rl.likelihood import answer_log_probs, draw_corruption
from dgemma_ft.finetune.rl.loss import clipped_policy_loss
from dgemma_ft.finetune.rl.rollouts import draw_rollouts, group_advantages, reward_of
from dgemma_ft.finetune.rl.run import rl_command, rl_settings
from dgemma_ft.finetune.rl.trainer import prepare_round, reference_off
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model
from dgemma_ft.inference.sampling import Generation
from dgemma_ft.plumbing import unwrap_model
from dgemma_ft.tasks import get_task
from dgemma_ft.tasks.base import Verdict

ROOT = Path(__file__).resolve().parent.parent
CANVAS = 24
SUDOKU = {"box_rows": 2, "box_cols": 2, "prompt_style": "grid"}


@pytest.fixture(scope="module")
def tiny():
    """A tiny model with one shared LoRA adapter whose B matrices are made non-zero (so the adapter changes the
    function, as after some training), and sudoku prompts."""
    torch.set_num_threads(1)  # as train.threads=1 does in test_train.py: a tiny model gains nothing from more
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 head_dim=16, global_head_dim=16, moe_intermediate_size=16,
                                                 canvas_length=CANVAS, seed=1))
    model = attach_lora(model.float(), 4, 8, 0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    task = get_task("sudoku", SUDOKU)
    examples = [dict(row) for row in task.build_dataset("train", {"source": "generate", "size": 3, "seed": 0})]
    return model, tokenizer, task, examples


def _rollouts(tiny, group_size=2, **settings):
    model, tokenizer, task, examples = tiny
    config = RLConfig(prompts_per_step=len(examples), group_size=group_size, rollout_steps=2, **settings)
    return config, draw_rollouts(model, tokenizer, task, examples, config, seed=0, max_new_tokens=CANVAS)


def _estimate(model, rollouts, corruption):
    """Mean log-likelihood estimate per answer (N,)."""
    scored = corruption.scored.float()
    return (answer_log_probs(model, rollouts.batch, corruption) * scored).sum((1, 2)) / scored.sum((1, 2))


# ------------------------------------------------------------------------------------------------ estimate
def test_estimate_is_the_training_objectives_denoising_likelihood(tiny):
    """With the same (here: no) corruption and all positions scored, minus the mean estimate is the objective's
    diffusion loss: RL and training measure one thing. Multi-block answers exercise the block prefix."""
    model, tokenizer, _, _ = tiny
    rows = [encode_example(tokenizer, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": text}],
                           CANVAS) for i, text in enumerate(["1234\n3412", "0123456789" * 5])]
    batch = as_block_batch(BlockCollator(tokenizer.pad_token_id)(rows))
    assert int(batch.num_blocks.max()) == 3
    base = unwrap_model(model)
    corruption = draw_corruption(batch, CANVAS, base.config.text_config.vocab_size, 1, (1e-9, 1e-9))
    assert torch.equal(corruption.noisy, corruption.clean)
    with torch.no_grad():
        ours = answer_log_probs(model, batch, corruption)[corruption.scored]
        objective = block_diffusion_loss(model, batch, ObjectiveConfig(self_conditioning_p=0, ar_weight=0,
                                                                       block_selection="all"), t_override=1e-9)
    torch.testing.assert_close(-ours.mean(), objective.diffusion_loss, atol=1e-5, rtol=0)


def test_corruption_keeps_pins_clean_and_out_of_the_estimate(tiny):
    config, rollouts = _rollouts(tiny)
    base = unwrap_model(tiny[0])
    corruption = draw_corruption(rollouts.batch, CANVAS, base.config.text_config.vocab_size, 3, (1.0, 1.0),
                                 rollouts.pinned, torch.Generator().manual_seed(0))
    held = rollouts.pinned.view(len(rollouts), 1, CANVAS).expand(-1, 3, -1)
    assert held.any()
    assert torch.equal(corruption.noisy[held], corruption.clean[held])
    assert not corruption.scored[held].any() and corruption.scored[~held].all()
    free = ~held
    assert (corruption.noisy[free] != corruption.clean[free]).float().mean() > 0.9  # t = 1: pure noise
    again = draw_corruption(rollouts.batch, CANVAS, base.config.text_config.vocab_size, 3, (1.0, 1.0),
                            rollouts.pinned, torch.Generator().manual_seed(0))
    assert torch.equal(again.noisy, corruption.noisy), "a seed gives one corruption"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_follows_the_advantage(tiny, sign):
    """An answer with positive advantage gains likelihood after one update, one with negative advantage loses it
    (measured under the same corruption)."""
    config, rollouts = _rollouts(tiny, group_size=2)
    model = copy.deepcopy(tiny[0]).train()
    base = unwrap_model(model)
    corruption = draw_corruption(rollouts.batch, CANVAS, base.config.text_config.vocab_size, 2, (0.5, 1.0),
                                 rollouts.pinned, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _estimate(model, rollouts, corruption)
    advantages = torch.zeros(len(rollouts))
    advantages[0] = sign
    new = answer_log_probs(model, rollouts.batch, corruption)
    out = clipped_policy_loss(new, new.detach(), advantages, corruption.scored, clip_eps=0.2)
    out.loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
        after = _estimate(model, rollouts, corruption)
    assert sign * (after[0] - before[0]) > 1e-4


def test_clipped_ratio_stops_the_gradient_past_the_clip():
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratio e^0.5 and e^-0.5 against old = 0
    out = clipped_policy_loss(new, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    out.loss.backward()
    assert new.grad[0, 0] == 0, "positive advantage, ratio above 1 + eps: clipped"
    assert new.grad[0, 1] < 0, "ratio below 1 - eps with positive advantage still pushes up"
    assert float(out.clip_fraction) == 0.5


# ------------------------------------------------------------------------------------ trajectory estimator
@pytest.fixture(scope="module")
def short_canvas():
    """A canvas of 8 tokens, so a Sudoku answer (~20 tokens) spans three blocks: later blocks read earlier ones
    from the prefix, as the sampler wrote them."""
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 head_dim=16, global_head_dim=16, moe_intermediate_size=16,
                                                 canvas_length=8, seed=1))
    model = attach_lora(model.float(), 4, 8, 0.0)
    task = get_task("sudoku", SUDOKU)
    examples = [dict(row) for row in task.build_dataset("train", {"source": "generate", "size": 3, "seed": 0})]
    return model, tokenizer, task, examples


@pytest.mark.parametrize("steps", [1, 3])
def test_trajectory_estimate_is_the_samplers_own_probability(short_canvas, steps):
    """Recomputed from the records, the log-probability of every kept draw equals what the sampler drew it with
    (self-conditioning, pins, renoising, the end-token block and later blocks' prefixes included); each block's
    answer is its last draw, and pinned givens are never counted."""
    model, tokenizer, task, examples = short_canvas
    config = RLConfig(prompts_per_step=3, group_size=2, rollout_steps=steps, renoise=True)
    rollouts = draw_rollouts(model, tokenizer, task, examples, config, seed=0, max_new_tokens=24)
    trajectory = rollouts.trajectory
    assert int(trajectory.block_index.max()) == 2 and (trajectory.signal is not None) == (steps > 1)
    with torch.no_grad():
        ours = trajectory.log_probs(model, rollouts.batch)
    torch.testing.assert_close(ours[trajectory.scored], trajectory.drawn_log_probs[trajectory.scored],
                               atol=1e-5, rtol=0)
    for row in range(len(rollouts)):
        answer = rollouts.batch.input_ids[row, int(rollouts.batch.prompt_lengths[row]):]
        for block in range(int(rollouts.batch.num_blocks[row])):
            last = (trajectory.block_index[row] == block).nonzero().max()
            written = answer[block * 8:(block + 1) * 8]
            drawn = trajectory.tokens[row, last][:len(written)]
            ends = (written == tokenizer.eos_token_id).nonzero()
            keep = int(ends.min()) if len(ends) else len(written)  # after the end: EOS filling, not the draw
            assert torch.equal(written[:keep], drawn[:keep])
            assert trajectory.scored[row, last].sum() == 8 - len([i for i in task.pinned(examples[row // 2])
                                                                  if block * 8 <= i < (block + 1) * 8])


def test_argmax_answers_are_the_evaluations_and_only_earlier_draws_count(short_canvas):
    """With `answer: argmax` the rollouts are what evaluation would answer with the same seeds (recording changes
    nothing), and the estimate counts only draws accepted before a block's last step."""
    model, tokenizer, task, examples = short_canvas
    config = RLConfig(prompts_per_step=3, group_size=2, rollout_steps=3, answer="argmax")
    rollouts = draw_rollouts(model, tokenizer, task, examples, config, seed=0, max_new_tokens=24)
    plain = RLConfig(prompts_per_step=3, group_size=2, rollout_steps=3, estimator="corruption")
    assert rollouts.texts == draw_rollouts(model, tokenizer, task, examples, plain, seed=0, max_new_tokens=24).texts
    trajectory = rollouts.trajectory
    for row in range(len(rollouts)):
        for block in trajectory.block_index[row].unique():
            steps = (trajectory.block_index[row] == block).nonzero().flatten()
            assert not trajectory.scored[row, steps[-1]].any(), "the last step's argmax is no draw"
    assert trajectory.scored.any(), "draws accepted at earlier steps are the policy's"
    with pytest.raises(ValueError, match="rollout_steps >= 2"):
        RLConfig(rollout_steps=1, answer="argmax")


def test_trajectory_ratio_is_one_and_the_gradient_follows_the_advantage(short_canvas):
    model, tokenizer, task, examples = short_canvas
    config = RLConfig(prompts_per_step=3, group_size=2, rollout_steps=2, inner_steps=2, kl_coef=0.1)
    rollouts = draw_rollouts(model, tokenizer, task, examples, config, seed=0, max_new_tokens=24)
    policy = copy.deepcopy(model).train()
    round_ = prepare_round(policy, rollouts, config, seed=0, round_index=0)
    assert round_.estimates[1] is round_.estimates[0], "nothing is drawn per inner step"
    new = rollouts.trajectory.log_probs(policy, rollouts.batch)
    advantages = torch.zeros(len(rollouts))
    advantages[0], advantages[1] = 1.0, -1.0
    out = clipped_policy_loss(new, round_.old[0], advantages, rollouts.trajectory.scored, 0.2, round_.reference[0], 0.0)
    assert float(out.ratio_mean) == 1.0
    out.loss.backward()
    scored = rollouts.trajectory.scored.float()

    def mean_log_prob():
        return (rollouts.trajectory.log_probs(policy, rollouts.batch) * scored).sum((1, 2)) / scored.sum((1, 2))

    with torch.no_grad():
        before = (round_.old[0] * scored).sum((1, 2)) / scored.sum((1, 2))
        for parameter in policy.parameters():
            if parameter.grad is not None:
                parameter -= 0.05 * parameter.grad
        after = mean_log_prob()
    assert after[0] - before[0] > 1e-4 and after[1] - before[1] < -1e-4


# ---------------------------------------------------------------------------------------- old, new, reference
def test_ratio_is_one_on_the_first_inner_step_and_reference_shares_the_corruption(tiny):
    config, rollouts = _rollouts(tiny, inner_steps=2, kl_coef=0.1, corruption_samples=2, estimator="corruption")
    model = copy.deepcopy(tiny[0]).train()
    round_ = prepare_round(model, rollouts, config, seed=0, round_index=0)
    assert len(round_.estimates) == 2 and not torch.equal(round_.estimates[0].noisy, round_.estimates[1].noisy)
    new = answer_log_probs(model, rollouts.batch, round_.estimates[0])
    out = clipped_policy_loss(new, round_.old[0], rollouts.advantages, round_.estimates[0].scored, 0.2,
                              round_.reference[0], 0.1)
    assert torch.equal(new.detach(), round_.old[0]) and float(out.ratio_mean) == 1.0
    with torch.no_grad(), reference_off(model):  # the reference: the base, adapter off, same corruption
        torch.testing.assert_close(answer_log_probs(model, rollouts.batch, round_.estimates[0]),
                                   round_.reference[0], atol=1e-6, rtol=0)
    assert float(out.kl) > 0, "the adapter changes the function, so the KL to the base is positive"


def test_updates_leave_the_reference_unchanged(tiny):
    config, rollouts = _rollouts(tiny, kl_coef=0.5)
    model = copy.deepcopy(tiny[0]).train()
    base = unwrap_model(model)
    corruption = draw_corruption(rollouts.batch, CANVAS, base.config.text_config.vocab_size, 1, (0.5, 1.0),
                                 rollouts.pinned, torch.Generator().manual_seed(2))
    with torch.no_grad(), reference_off(model):
        reference = answer_log_probs(model, rollouts.batch, corruption)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    advantages = torch.linspace(-1, 1, len(rollouts))
    for _ in range(3):
        new = answer_log_probs(model, rollouts.batch, corruption)
        clipped_policy_loss(new, new.detach(), advantages, corruption.scored, 0.2, reference, 0.5).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        policy = answer_log_probs(model, rollouts.batch, corruption)
        with reference_off(model):
            assert torch.equal(answer_log_probs(model, rollouts.batch, corruption), reference)
    assert not torch.allclose(policy, reference), "the policy moved"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------- rewards, advantages
def test_rewards_mix_the_verdict_and_advantages_are_group_normalised():
    verdict = Verdict(valid=True, correct=False, score=0.5, reason="")
    assert reward_of(verdict, RewardWeights()) == 0.0
    assert reward_of(verdict, RewardWeights(correct=1, score=0.5, valid=0.1)) == pytest.approx(0.35)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), 3)
    assert advantages[0] > 0 > advantages[1] and advantages[1] == advantages[2]
    torch.testing.assert_close(advantages.view(2, 3).sum(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages.view(2, 3).std(1), torch.ones(2), atol=1e-3, rtol=0)
    flat = group_advantages(torch.tensor([1.0, 1.0]), 2)
    assert torch.equal(flat, torch.zeros(2)), "a group whose answers all earn the same teaches nothing"
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 2, scale=False), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="every reward weight is 0"):
        RewardWeights(correct=0)


def test_rollouts_are_judged_by_validate(tiny, monkeypatch):
    """Members 0 of each group answer with the solution, members 1 with a wrong grid: rewards come from the
    task's verdicts, and the EOS-filled answer rows and pins follow the sampler's output."""
    model, tokenizer, task, examples = tiny
    end = end_of_turn_id(tokenizer)

    def answers(self, requests, pin=True, renoise=False, trace_index=None, **_):
        out = []
        for index, request in enumerate(requests):
            example = examples[index // 2]
            text = task.target(example) if index % 2 == 0 else "1111\n1111\n1111\n1111"
            out.append(Generation(token_ids=tokenizer(text, add_special_tokens=False)["input_ids"] + [end]))
        return out

    monkeypatch.setattr(rollouts_module.BlockDiffusionSampler, "generate", answers)
    config = RLConfig(prompts_per_step=3, group_size=2, reward={"correct": 1.0, "valid": 0.5}, estimator="corruption")
    rollouts = draw_rollouts(model, tokenizer, task, examples, config, seed=0, max_new_tokens=CANVAS)
    assert rollouts.rewards.tolist() == [1.5, 0.5] * 3
    assert rollouts.correct.tolist() == [True, False] * 3 and rollouts.valid.all()
    assert (rollouts.advantages[0::2] > 0).all() and (rollouts.advantages[1::2] < 0).all()
    row = rollouts.batch.input_ids[0, int(rollouts.batch.prompt_lengths[0]):]
    answer_length = int(rollouts.batch.response_lengths[0])
    assert row[answer_length - 1] == end and (row[answer_length:CANVAS] == tokenizer.eos_token_id).all()
    givens = task.pinned(examples[0])
    assert sorted(rollouts.pinned[0].nonzero().flatten().tolist()) == sorted(givens), "one char = one token"
    assert rollouts.figures()["solve_rate"] == 0.5 and rollouts.figures()["flat_groups"] == 0.0


def test_reward_curve_shows_rewards_above_one(tmp_path, monkeypatch):
    """Weights can sum past 1 (correct + score): the axis grows to hold the mean reward."""
    from dgemma_ft.finetune.rl import curve

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.0, "reward_mean": 1.2 + s / 100, "solve_rate": 0.5})
                           + "\n" for s in range(1, 13)))
    limits = []
    monkeypatch.setattr(curve, "write_png", lambda out, figure: limits.append(figure.axes[0].get_ylim()))
    assert curve.plot_reward_curve(log, tmp_path / "curve.png") == tmp_path / "curve.png"
    assert limits[0][0] == 0 and limits[0][1] >= 1.32
    log.write_text(json.dumps({"step": 1, "loss": 0.0}) + "\n")
    assert curve.plot_reward_curve(log, tmp_path / "none.png") is None, "no rollout figures yet: no curve"


# ---------------------------------------------------------------------------------------------- recipe, driver
def test_rl_section_errors_name_the_key(tmp_path):
    recipe = ROOT / "recipes" / "sudoku-4x4-rl-tiny.yaml"
    with pytest.raises(UserError, match=r"rl\.group_sise: unknown key; did you mean 'group_size'"):
        load_recipe(recipe, ["rl.group_sise=4"])
    with pytest.raises(UserError, match=r"rl\.group_size: .*greater than or equal to 2"):
        load_recipe(recipe, ["rl.group_size=1"])
    with pytest.raises(UserError, match="micro_batch"):
        load_recipe(recipe, ["rl.micro_batch=7"])
    with pytest.raises(UserError, match="LoRA adapter only"):
        rl_settings(load_recipe(recipe, ["finetune=full"]))
    with pytest.raises(UserError, match=r"task\.train_also: rl draws its prompts from task\.train alone"):
        rl_settings(load_recipe(recipe, ["task.train_also=[{source: generate, size: 4}]"]))
    with pytest.raises(UserError, match="no 'rl:' section"):
        rl_command(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [f"train.output_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


SMALL = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
         "model.tiny.head_dim=16", "model.tiny.global_head_dim=16", "model.tiny.moe_intermediate_size=16",
         "task.train.size=64", "task.eval.size=8", "train.batch_size=4", "train.warmup_steps=1", "train.steps=2",
         "train.threads=1", "task.exclude_sources=[]"]


def test_rl_run_folder_logs_and_resume(tmp_path):
    from dgemma_ft.finetune.run import train

    base = train(load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [*SMALL, f"train.output_dir={tmp_path / 'base'}"]))
    run_dir = tmp_path / "rl"
    overrides = [f"model.name={base}", f"train.output_dir={run_dir}", "task.train.size=32", "task.eval.size=4",
                 "rl.steps=2", "rl.warmup_steps=0", "rl.prompts_per_step=2", "rl.group_size=2", "rl.inner_steps=2", "rl.micro_batch=2",
                 "rl.kl_coef=0.1", "train.checkpoint_every=1", "train.log_every=1", "train.threads=1",
                 "eval.steps=[1]", "lora.r=4", "task.exclude_sources=[]"]
    run, report = rl_command(ROOT / "recipes" / "sudoku-4x4-rl-tiny.yaml", overrides)
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "reward_curve.png").exists()
    assert load_recipe(run / "recipe.yaml").rl.steps == 2
    log = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert {"reward_mean", "solve_rate", "ratio_mean", "clip_fraction", "kl", "ratio_first_inner"} <= set(steps[0])
    assert steps[0]["ratio_first_inner"] == 1.0 and "reward_mean" not in steps[1], "one rollout batch, 2 updates"
    assert [r["model"] for r in report["results"]] == ["adapter", "base"]

    run, _ = rl_command(run / "recipe.yaml", ["rl.steps=3"], resume=True, evaluate=False)
    log = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from_step"] == 2
