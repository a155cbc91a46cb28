"""The log-likelihood estimate of an answer under a block-diffusion policy with uniform-noise corruption.

DiffusionGemma has no mask token, so the masked-diffusion estimators of d1 / wd1 do not carry over as they are.
The estimate here is what the kit's training objective already measures: copy the answer's canvases, replace
each position by a uniformly random token with probability t (t uniform in `corruption_t`, one t per canvas and
copy), let the decoder denoise the copies with the clean prompt and earlier answer blocks as its prefix (exactly
the objective's masks), and read the log-probability of every answer token at every supervised position:

    log pi(y | x)  ~  log p_theta(y_i | x, y_<block, corrupt_t(y_block))     per position i, one term per copy

Positions the sampler pinned (Sudoku givens) stay clean in the copy, as the sampler shows them, and are left out
of the estimate: the policy never chose them. No self-conditioning signal is fed (the sampler's first step has
none). The corruption of a rollout batch is drawn once per inner step and shared by the old policy, the new
policy and the reference, so their ratio compares the same quantity (d1 does this with its masks); at the first
inner step the ratio is then exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dgemma_ft.finetune.objective import BlockBatch, corrupt, decode_canvases, encode_shared_prefix
from dgemma_ft.plumbing import chunk_rows, softcapped_logits, unwrap_model


@dataclass
class Corruption:
    """Corrupted copies of every block of every answer: K = blocks x copies canvases per row."""

    block_index: torch.Tensor  # (B, K) which answer block each canvas copies
    block_valid: torch.Tensor  # (B, K) False for blocks past a shorter answer's end
    clean: torch.Tensor  # (B, K, C) the answer's tokens
    noisy: torch.Tensor  # (B, K, C) what the decoder reads
    scored: torch.Tensor  # (B, K, C) bool: positions the estimate counts
    t: torch.Tensor  # (B, K) noise level of each copy

    def rows(self, rows: slice) -> Corruption:
        return Corruption(*(getattr(self, name)[rows] for name in
                            ("block_index", "block_valid", "clean", "noisy", "scored", "t")))

    def log_probs(self, model, batch: BlockBatch) -> torch.Tensor:
        return answer_log_probs(model, batch, self)


def draw_corruption(batch: BlockBatch, canvas_length: int, vocab_size: int, copies: int,
                    levels: tuple[float, float], pinned: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, group_size: int = 1) -> Corruption:
    """`copies` corrupted copies of each answer block of `batch`, at noise levels uniform in `levels`; `pinned`
    (B, blocks * C) marks answer positions kept clean and left out of the estimate. With `group_size` > 1, each
    run of that many rows (the answers to one prompt) shares one draw: the same t, the same positions replaced
    and the same random tokens there. Drawn on the CPU from `generator`, so the same seed gives the same
    corruption on any device."""
    input_ids = batch.input_ids.cpu()
    rows, length = input_ids.shape
    num_blocks = batch.num_blocks.cpu()
    blocks = int(num_blocks.max())
    block_index = torch.arange(blocks).repeat(copies).expand(rows, -1)  # copy s holds blocks s*blocks ...
    block_valid = block_index < num_blocks[:, None]
    starts = batch.prompt_lengths.cpu()[:, None] + block_index * canvas_length
    positions = (starts[:, :, None] + torch.arange(canvas_length)).clamp(max=length - 1)
    clean = input_ids.gather(1, positions.flatten(1)).view(rows, -1, canvas_length)
    low, high = levels
    if group_size > 1:  # one draw per group, repeated for its answers
        groups = rows // group_size
        t = low + (high - low) * torch.rand(groups, block_index.shape[1], generator=generator)
        replace = torch.rand(groups, *clean.shape[1:], generator=generator) < t[..., None]
        tokens = torch.randint(0, vocab_size, (groups, *clean.shape[1:]), generator=generator)
        t, replace, tokens = (x.repeat_interleave(group_size, dim=0) for x in (t, replace, tokens))
        noisy = torch.where(replace, tokens, clean)
    else:
        t = low + (high - low) * torch.rand(rows, block_index.shape[1], generator=generator)
        noisy = corrupt(clean, t, vocab_size, generator)
    scored = block_valid[:, :, None].expand(-1, -1, canvas_length).clone()
    if pinned is not None:
        held = pinned.cpu().view(rows, blocks, canvas_length).repeat(1, copies, 1)
        noisy = torch.where(held, clean, noisy)
        scored &= ~held
    return Corruption(block_index=block_index.contiguous(), block_valid=block_valid, clean=clean, noisy=noisy,
                      scored=scored, t=t)


def answer_log_probs(model, batch: BlockBatch, corruption: Corruption) -> torch.Tensor:
    """(B, K, C) float32: the log-probability of each clean answer token given its corrupted canvas copy, under
    `model` as it is (with LoRA: the adapter on, unless inside `model.disable_adapter()`)."""
    base = unwrap_model(model)
    device = base.lm_head.weight.device
    canvas_length = base.config.canvas_length
    input_ids = batch.input_ids.to(device)
    block_index = corruption.block_index.to(device)
    starts = batch.prompt_lengths.to(device)[:, None] + block_index * canvas_length
    needed = int(starts[corruption.block_valid.to(device)].max())  # the encoder reads up to the last block start
    prefix = encode_shared_prefix(base, input_ids[:, :max(needed, 1)])
    hidden = decode_canvases(base, corruption.noisy.to(device).flatten(1), starts, prefix)
    return token_log_probs(base, hidden, corruption.clean.to(device).flatten(1)).view(corruption.clean.shape)


def _gathered(base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(softcapped_logits(base, hidden), targets, reduction="none")


def token_log_probs(base, hidden: torch.Tensor, targets: torch.Tensor, chunk_elements: int | None = None):
    """log p(target) per position for decoder states `hidden` (..., H), with at most one chunk of float32
    vocabulary logits alive (recomputed in backward), as `plumbing.chunked_cross_entropy` does for the mean."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    step = chunk_rows(base.config.text_config.vocab_size, chunk_elements)
    if flat.shape[0] <= step:
        return _gathered(base, flat, targets)
    pieces = []
    for begin in range(0, flat.shape[0], step):
        rows = slice(begin, begin + step)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_gathered, base, flat[rows], targets[rows], use_reentrant=False))
        else:
            pieces.append(_gathered(base, flat[rows], targets[rows]))
    return torch.cat(pieces)
