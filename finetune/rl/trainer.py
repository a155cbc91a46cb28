"""GRPO for block diffusion on a thin `transformers.Trainer` subclass.

TRL's `GRPOTrainer` samples autoregressively (`model.generate` / vLLM) and scores answers with per-token
autoregressive log-probabilities; neither fits a block-diffusion policy. This subclass keeps what the Trainer
does well (the optimizer, schedule, gradient accumulation and clipping, checkpoints with their rotation, `--resume`
with its RNG state, logging, TensorBoard), and adds, in `compute_loss` only:

- every `inner_steps` updates, a rollout batch (`rollouts.draw_rollouts`), and the old policy's (and the
  reference's) log-probabilities of it without gradients: of its recorded draws (`trajectory`), or under one
  corruption per inner step (`likelihood`);
- per forward/backward pass, one micro-batch of that rollout batch: the new policy's log-probabilities of the
  same thing, and the clipped objective (`loss.clipped_policy_loss`).

The "dataset" is a schedule of pass descriptors (update, micro-batch): the Trainer draws them as it would draw
batches, so its accumulation and resume skipping apply unchanged. Prompts, sampler seeds and corruptions are seeded
by the round, so a run resumed at a round boundary draws exactly what the uninterrupted run drew; resumed inside a
round (inner_steps > 1, a checkpoint between its updates), it draws that round again from the restored policy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Trainer

from dgemma_ft.finetune.rl.config import RLConfig
from dgemma_ft.finetune.rl.likelihood import Corruption, draw_corruption
from dgemma_ft.finetune.rl.loss import clipped_policy_loss
from dgemma_ft.finetune.rl.rollouts import Rollouts
from dgemma_ft.finetune.rl.trajectory import Trajectory
from dgemma_ft.finetune.trainer import AveragedFigures, RichProgress, refuse_non_finite
from dgemma_ft.plumbing import unwrap_model


class PassSchedule(torch.utils.data.IterableDataset):
    """One item per forward/backward pass: which update and micro-batch it is (the rollout round and inner step
    follow from the Trainer's own step count, so they stay right however the Trainer skips items on resume)."""

    def __init__(self, updates: int, micro_batches: int):
        self.updates, self.micro_batches = updates, micro_batches

    def __iter__(self):
        for update in range(self.updates):
            for micro in range(self.micro_batches):
                yield {"update": update, "micro": micro}


def one_item(items: list[dict]) -> dict[str, torch.Tensor]:
    """The collator: the Trainer draws batches of one pass descriptor, as 1-element tensors (accelerate's data
    loader reads the batch size off the first tensor)."""
    return {name: torch.tensor([value]) for name, value in items[0].items()}


@dataclass
class Round:
    """A rollout batch and what every inner step reads: what the estimate scores (the recorded trajectory, or
    that step's corruption), the old and reference log-probs."""

    index: int
    rollouts: Rollouts
    estimates: list[Trajectory | Corruption]
    old: list[torch.Tensor]
    reference: list[torch.Tensor | None]


def corruption_generator(seed: int, round_index: int, inner: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + round_index) * 64 + inner)


def reference_off(model):
    """The reference policy: with LoRA, the base with the adapter switched off (peft's `disable_adapter()`)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def log_probs_in_chunks(model, rollouts: Rollouts, estimate: Trajectory | Corruption,
                        micro_batch: int) -> torch.Tensor:
    """The estimate's log-probs over the whole rollout batch, a micro-batch at a time, without gradients (CPU)."""
    pieces = []
    with torch.no_grad():
        for begin in range(0, len(rollouts), micro_batch):
            rows = slice(begin, begin + micro_batch)
            pieces.append(estimate.rows(rows).log_probs(model, rows_of(rollouts.batch, rows)).cpu())
    return torch.cat(pieces)


def rows_of(batch, rows: slice):
    return type(batch)(input_ids=batch.input_ids[rows], prompt_lengths=batch.prompt_lengths[rows],
                       response_lengths=batch.response_lengths[rows], num_blocks=batch.num_blocks[rows])


def prepare_round(model, rollouts: Rollouts, settings: RLConfig, seed: int, round_index: int) -> Round:
    """What every inner step scores and the old (and reference) log-probabilities of it: the recorded trajectory
    (the same for every inner step: computed once), or a fresh corruption per inner step."""
    base = unwrap_model(model)
    micro = settings.micro_batch or len(rollouts)
    estimates, old, reference = [], [], []
    was_training = model.training
    model.eval()
    try:
        for inner in range(settings.inner_steps):
            if rollouts.trajectory is not None and inner > 0:  # nothing is drawn: reuse the first inner step's
                estimates.append(estimates[0])
                old.append(old[0])
                reference.append(reference[0])
                continue
            estimate = rollouts.trajectory if rollouts.trajectory is not None else draw_corruption(
                rollouts.batch, base.config.canvas_length, base.config.text_config.vocab_size,
                settings.corruption_samples, settings.corruption_t, rollouts.pinned if settings.keep_pinned else None,
                corruption_generator(seed, round_index, inner), rollouts.group_size if settings.shared_noise else 1)
            estimates.append(estimate)
            old.append(log_probs_in_chunks(model, rollouts, estimate, micro))
            if settings.kl_coef > 0:
                with reference_off(model):
                    reference.append(log_probs_in_chunks(model, rollouts, estimate, micro))
            else:
                reference.append(None)
    finally:
        model.train(was_training)
    return Round(round_index, rollouts, estimates, old, reference)


class BlockDiffusionGRPOTrainer(AveragedFigures, Trainer):
    def __init__(self, *args, settings: RLConfig, draw_rollouts: Callable[[int], Rollouts], seed: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.draw_rollouts = draw_rollouts  # round index -> Rollouts (from the current policy)
        self.seed = seed
        self.round: Round | None = None

    def current_round(self, model, index: int) -> Round:
        """The rollout batch of round `index`, drawn when its first pass arrives (again after a resume)."""
        if self.round is None or self.round.index != index:
            self.round = None  # free the last round before drawing the next
            started = time.perf_counter()
            rollouts = self.draw_rollouts(index)
            self.round = prepare_round(model, rollouts, self.settings, self.seed, index)
            self.note({**rollouts.figures(), "rollout_seconds": time.perf_counter() - started})
        return self.round

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step  # the update this pass belongs to
        current = self.current_round(model, step // self.settings.inner_steps)
        inner = step % self.settings.inner_steps
        micro = self.settings.micro_batch or len(current.rollouts)
        rows = slice(int(inputs["micro"]) * micro, (int(inputs["micro"]) + 1) * micro)
        estimate = current.estimates[inner].rows(rows)
        new = estimate.log_probs(model, rows_of(current.rollouts.batch, rows))
        reference = current.reference[inner]
        out = clipped_policy_loss(new, current.old[inner][rows], current.rollouts.advantages[rows],
                                  estimate.scored, self.settings.clip_eps,
                                  None if reference is None else reference[rows], self.settings.kl_coef)
        refuse_non_finite(self, out.loss, "Lower rl.lr, or use model.dtype: float32")
        figures = {"ratio_mean": float(out.ratio_mean), "clip_fraction": float(out.clip_fraction)}
        if out.kl is not None:
            figures["kl"] = float(out.kl)
        if inner == 0:
            figures["ratio_first_inner"] = float(out.ratio_mean)
        self.note(figures)
        return (out.loss, out) if return_outputs else out.loss

    def floating_point_ops(self, inputs) -> int:
        return 0  # the inputs are pass descriptors, not tokens; the Trainer's estimate would warn and guess 0



class RLProgress(RichProgress):
    """The training progress bar, with the reward, solve rate, ratio clip fraction and KL instead of the loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "loss" not in logs:
            return
        figures = ""
        if "reward_mean" in logs:
            figures += f"reward {logs['reward_mean']:.3f}  solved {logs['solve_rate']:.1%}  "
        figures += f"clip {logs.get('clip_fraction', 0):.3f}"
        if "kl" in logs:
            figures += f"  kl {logs['kl']:.4f}"
        figures += f"  lr {logs.get('learning_rate', 0):.2e}"
        self.progress.update(self.task, figures=figures)
