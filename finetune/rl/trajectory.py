"""The exact log-likelihood of a rollout under the bundled sampler (the default RL estimator, `estimator: trajectory`).

With `answer="sampled"` the sampler is a stochastic policy whose every random choice is recorded
(`inference.sampling.StepRecord`): at each denoising step the decoder reads a canvas (earlier draws plus uniform
noise) and a self-conditioning signal, and the step keeps some of its temperature-scaled draws (the accepted ones;
on a block's last step, every position: that draw is the answer). The probability of the whole rollout is then

    log pi(rollout | x)  =  sum over steps s, kept positions i of  log softmax(logits_s / T_s)[token_s,i]

with the logits recomputed from the recorded inputs by the policy being scored. What is treated as given (the
environment of the step, not the policy's choice): the noise tokens, which positions the entropy rule accepted,
the self-conditioning signal (a no-grad input, as in training), and the pinned tokens (never counted). Special
tokens are blocked where the sampler blocked them, so the distribution is normalised over what it could draw.

Nothing is sampled here, so the old policy, the new policy and the reference read the same inputs; at the first
inner step the ratio is exactly 1. One decoder pass per recorded step: rollouts at few steps cost little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dgemma_ft.finetune.objective import BlockBatch, decode_canvases, encode_shared_prefix
from dgemma_ft.inference.sampling import StepRecord
from dgemma_ft.plumbing import chunk_rows, softcapped_logits, unwrap_model


@dataclass
class Trajectory:
    """The recorded steps of every rollout, padded to the longest: K step-canvases per row."""

    block_index: torch.Tensor  # (N, K) the answer block each step denoised
    canvas: torch.Tensor  # (N, K, C) what the decoder read
    signal: torch.Tensor | None  # (N, K, C, H) self-conditioning input (zeros on a block's first step, as HF
    # feeds); None when every recorded step was a first step
    temperature: torch.Tensor  # (N, K)
    no_end: torch.Tensor  # (N, K, C) bool: special tokens were blocked here
    tokens: torch.Tensor  # (N, K, C) the draws
    scored: torch.Tensor  # (N, K, C) bool: the draws the policy kept (the estimate counts these)
    drawn_log_probs: torch.Tensor  # (N, K, C) their log-probabilities as the sampler computed them (a check)
    special_ids: list[int]  # the tokens the sampler blocked at `no_end` positions

    def rows(self, rows: slice) -> Trajectory:
        return Trajectory(*(None if getattr(self, name) is None else getattr(self, name)[rows] for name in
                            ("block_index", "canvas", "signal", "temperature", "no_end", "tokens", "scored",
                             "drawn_log_probs")),
                          special_ids=self.special_ids)

    def log_probs(self, model, batch: BlockBatch) -> torch.Tensor:
        return trajectory_log_probs(model, batch, self)


def stack_records(records: list[list[StepRecord]], hidden_size: int, special_ids: list[int]) -> Trajectory:
    """One `Trajectory` from each rollout's step records (rows with fewer steps are padded with unscored steps)."""
    steps = max(1, max(len(r) for r in records))
    canvas_length = next((len(s.canvas) for r in records for s in r), 1)
    rows = len(records)
    signal = next((s.signal for r in records for s in r if s.signal is not None), None)
    out = Trajectory(block_index=torch.zeros(rows, steps, dtype=torch.long),
                     canvas=torch.zeros(rows, steps, canvas_length, dtype=torch.long),
                     signal=None if signal is None else torch.zeros(rows, steps, canvas_length, hidden_size,
                                                                   dtype=signal.dtype),  # the model's dtype
                     temperature=torch.ones(rows, steps),
                     no_end=torch.zeros(rows, steps, canvas_length, dtype=torch.bool),
                     tokens=torch.zeros(rows, steps, canvas_length, dtype=torch.long),
                     scored=torch.zeros(rows, steps, canvas_length, dtype=torch.bool),
                     drawn_log_probs=torch.zeros(rows, steps, canvas_length), special_ids=list(special_ids))
    for row, taken in enumerate(records):
        for k, step in enumerate(taken):
            out.block_index[row, k] = step.block
            out.canvas[row, k] = step.canvas
            if step.signal is not None:
                out.signal[row, k] = step.signal
            out.temperature[row, k] = step.temperature
            out.no_end[row, k] = step.no_end
            out.tokens[row, k] = step.tokens
            out.scored[row, k] = step.chosen
            out.drawn_log_probs[row, k] = step.log_probs
    return out


def trajectory_log_probs(model, batch: BlockBatch, trajectory: Trajectory) -> torch.Tensor:
    """(N, K, C) float32: the log-probability of each recorded draw under `model` as it is (with LoRA: the adapter
    on, unless inside `model.disable_adapter()`); `batch` holds the prompts and answers (the prefix of later blocks)."""
    base = unwrap_model(model)
    device = base.lm_head.weight.device
    dtype = base.model.decoder.embed_tokens.weight.dtype
    canvas_length = base.config.canvas_length
    input_ids = batch.input_ids.to(device)
    block_index = trajectory.block_index.to(device)
    starts = batch.prompt_lengths.to(device)[:, None] + block_index * canvas_length
    prefix = encode_shared_prefix(base, input_ids[:, :max(int(starts.max()), 1)])
    signal = None if trajectory.signal is None else trajectory.signal.to(device, dtype).flatten(1, 2)
    hidden = decode_canvases(base, trajectory.canvas.to(device).flatten(1), starts, prefix, signal)
    temperature = trajectory.temperature.to(device)[..., None].expand(trajectory.canvas.shape)
    return tempered_log_probs(base, hidden, trajectory.tokens.to(device), temperature,
                              trajectory.no_end.to(device), trajectory.special_ids).view(trajectory.canvas.shape)


def _tempered(base, hidden, targets, temperature, no_end, blocked):
    logits = softcapped_logits(base, hidden) / temperature[:, None]
    if blocked.numel():
        column = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        column[blocked] = True
        logits = logits.masked_fill(no_end[:, None] & column[None], torch.finfo(logits.dtype).min)
    return -F.cross_entropy(logits, targets, reduction="none")


def tempered_log_probs(base, hidden, targets, temperature, no_end, special_ids: list[int],
                       chunk_elements: int | None = None) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, special tokens blocked where `no_end`, as the sampler's step
    computes it; at most one chunk of float32 vocabulary logits alive (recomputed in backward)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets, temperature, no_end = targets.reshape(-1), temperature.reshape(-1), no_end.reshape(-1)
    blocked = torch.tensor(special_ids, dtype=torch.long, device=flat.device)
    step = chunk_rows(base.config.text_config.vocab_size, chunk_elements)
    pieces = []
    for begin in range(0, flat.shape[0], step):
        rows = slice(begin, begin + step)
        args = (base, flat[rows], targets[rows], temperature[rows], no_end[rows], blocked)
        if torch.is_grad_enabled() and flat.shape[0] > step:
            pieces.append(checkpoint(_tempered, *args, use_reentrant=False))
        else:
            pieces.append(_tempered(*args))
    return torch.cat(pieces)
