"""The block-diffusion training objective for DiffusionGemma, in one readable file.

One training example is a prompt and a response. The response is cut into canvas-sized blocks and EOS-filled to
a whole number of blocks. Then, per step:

1. The encoder reads the clean sequence (prompt + all response blocks) causally, once, into a KV prefix that
   keeps every position (no sliding-window cropping: the window is applied in the decoder's mask instead).
2. Blocks to denoise are chosen: `random` (one block per example, like the public reference) or `all` (every
   block of every example in one decoder pass, block-causally masked, each block with its own t). With
   `canvas_samples` = n > 1 each chosen block is denoised n times, under n independent corruptions, in the same
   decoder pass: the encoder pass (most of the cost when prompts are long) is shared by n loss samples.
3. Each chosen block gets t = eps + (1 - eps) * U, and each of its canvas positions is replaced by a uniformly
   random vocabulary token with probability t (DiffusionGemma has no mask token).
4. The decoder denoises the corrupted canvases. A canvas may see only the prompt and the clean blocks before
   its own (for sliding-window layers: only the last `sliding_window - 1` of them, as the inference cache keeps)
   plus its own canvas, through an explicit additive mask. This reproduces, position for position, what
   `model.generate()` computes at inference (tests/test_objective.py checks the logits to 1e-5).
5. With probability `self_conditioning_p` per example, a first no-grad decoder pass produces logits whose
   softmax-weighted embeddings (what HF's decoder makes of `self_conditioning_logits`) are fed to the second pass
   (only the chosen examples run the first pass; optionally at the sampler's temperature for the block's t).
6. Loss = flat cross-entropy over every supervised canvas position (EOS fill included, no 1/t weight)
   + `ar_weight` * next-token cross-entropy of the encoder over the response tokens. Both are computed a chunk of
   positions at a time (`dgemma_ft.plumbing.chunked_cross_entropy`): a 262k vocabulary never needs the whole
   (positions x vocabulary) float32 logits in memory.

Masks, the KV prefix and the logit plumbing are shared with the sampler in `dgemma_ft/plumbing.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dgemma_ft.plumbing import (PrefixKV, causal_encoder_masks, chunked_cross_entropy, decoder_masks, run_decoder,
                                run_encoder, soft_embeddings, softcapped_logits, unwrap_model)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Knobs of the objective (the recipe's `train` section holds them)."""

    eps: float = 1e-3
    self_conditioning_p: float = 0.5
    ar_weight: float = 1.0
    block_selection: Literal["random", "all"] = "random"
    canvas_samples: int = 1  # independent corruptions of each chosen block, sharing one encoder pass
    # None: feed back raw logits (the public reference). (t_min, t_max): divide them by t_min + (t_max - t_min) * t,
    # the temperature the sampler applies at the step whose noise level is t.
    self_conditioning_temperature: tuple[float, float] | None = None


@dataclass
class BlockBatch:
    """A collated batch. `input_ids` holds prompt + EOS-filled response per row, right-padded."""

    input_ids: torch.Tensor  # (B, L) long
    prompt_lengths: torch.Tensor  # (B,) long
    response_lengths: torch.Tensor  # (B,) long: real response tokens (end-of-turn included), before EOS fill
    num_blocks: torch.Tensor  # (B,) long


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor | None
    mean_t: torch.Tensor
    block_index: torch.Tensor  # (B, K) which response block each canvas is
    block_valid: torch.Tensor  # (B, K) False for padding blocks in `all` mode
    noisy_canvas: torch.Tensor  # (B, K, C) what the decoder read
    clean_canvas: torch.Tensor  # (B, K, C)
    canvas_logits: torch.Tensor | None = None  # (B, K, C, V), only with `return_logits` (small models: tests)


# ---------------------------------------------------------------------------------------------------- pieces
def encode_prefix(base, input_ids: torch.Tensor):
    """Run the encoder causally over `input_ids` (B, L); returns (last hidden state, full-length PrefixKV)."""
    length = input_ids.shape[1]
    dtype = base.model.decoder.embed_tokens.weight.dtype
    prefix = PrefixKV()
    masks = causal_encoder_masks(length, base.config.text_config.sliding_window, dtype, input_ids.device)
    hidden = run_encoder(base, input_ids, prefix, masks, torch.arange(length, device=input_ids.device)[None])
    return hidden, prefix


def encode_shared_prefix(base, input_ids: torch.Tensor) -> PrefixKV:
    """`encode_prefix`'s KV prefix, with the encoder run once per distinct row: RL scores a group of answers to one
    prompt, whose prefixes (the prompt, for one-block answers) are the same. Gradients reach the shared pass."""
    unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return encode_prefix(base, input_ids)[1]
    return encode_prefix(base, unique)[1].select(inverse)


def decode_canvases(base, canvas: torch.Tensor, starts: torch.Tensor, prefix: PrefixKV,
                    signal: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder hidden states (B, K*C, H) for canvases (B, K*C) of blocks starting at `starts` (B, K), with the
    self-conditioning `signal` (B, K*C, H) or None."""
    canvas_length = canvas.shape[1] // starts.shape[1]
    dtype = base.model.decoder.embed_tokens.weight.dtype
    length = prefix.get_seq_length()
    key_pos = torch.arange(length, device=canvas.device)[None].expand(canvas.shape[0], -1)
    key_ok = torch.ones_like(key_pos, dtype=torch.bool)
    masks = decoder_masks(key_pos, key_ok, starts, canvas_length, base.config.text_config.sliding_window, dtype)
    positions = (starts[:, :, None] + torch.arange(canvas_length, device=canvas.device)).flatten(1)
    return run_decoder(base, canvas, prefix, masks, positions, signal)


def corrupt(clean: torch.Tensor, t: torch.Tensor, vocab_size: int, generator=None) -> torch.Tensor:
    """Replace each position of `clean` (..., C) by a uniform random token with probability t (...)."""
    replace = torch.rand(clean.shape, device=clean.device, generator=generator) < t[..., None]
    random_tokens = torch.randint(0, vocab_size, clean.shape, device=clean.device, generator=generator)
    return torch.where(replace, random_tokens, clean)


def self_conditioning_signal(base, canvas, starts, prefix, t, config: ObjectiveConfig, generator=None):
    """The no-grad first pass for the examples drawn to use self-conditioning: (signal (B, K*C, H), or None)."""
    batch_size, blocks = t.shape
    device = canvas.device
    chosen = torch.rand(batch_size, device=device, generator=generator) < config.self_conditioning_p
    rows = chosen.nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    temperature = None
    if config.self_conditioning_temperature is not None:
        t_min, t_max = config.self_conditioning_temperature
        per_block = t_min + (t_max - t_min) * t[rows]
        temperature = per_block.repeat_interleave(canvas.shape[1] // blocks, dim=1)
    with torch.no_grad():
        hidden = decode_canvases(base, canvas[rows], starts[rows], prefix.select(rows))
        signal_rows = soft_embeddings(base, hidden, temperature)
    signal = signal_rows.new_zeros(batch_size, *signal_rows.shape[1:])
    signal[rows] = signal_rows
    return signal


# ----------------------------------------------------------------------------------------------- the objective
def block_diffusion_loss(model, batch: BlockBatch, config: ObjectiveConfig, generator=None,
                         t_override: float | None = None, return_logits: bool = False) -> ObjectiveOutput:
    """Compute the block-diffusion loss for `batch` (see the module docstring).

    `t_override` fixes t for every block (tests use it to check the t -> 0 and t -> 1 limits); `return_logits`
    also returns the full canvas logits (B, K, C, V), for small models only.
    """
    base = unwrap_model(model)
    text_config = base.config.text_config
    canvas_length = base.config.canvas_length
    input_ids = batch.input_ids
    device = input_ids.device
    batch_size = input_ids.shape[0]
    num_blocks = batch.num_blocks.to(device)
    prompt_lengths = batch.prompt_lengths.to(device)

    # 2. choose blocks
    if config.block_selection == "random":
        draw = torch.rand(batch_size, device=device, generator=generator)
        block_index = (draw * num_blocks).long().clamp(max=num_blocks - 1)[:, None]
    else:
        block_index = torch.arange(int(num_blocks.max()), device=device).expand(batch_size, -1)
    if config.canvas_samples > 1:
        block_index = block_index.repeat_interleave(config.canvas_samples, dim=1)
    block_valid = block_index < num_blocks[:, None]
    starts = prompt_lengths[:, None] + block_index * canvas_length  # (B, K)
    blocks = block_index.shape[1]
    offsets = torch.arange(canvas_length, device=device)
    positions = (starts[:, :, None] + offsets).clamp(max=input_ids.shape[1] - 1)
    clean = input_ids.gather(1, positions.flatten(1)).view(batch_size, blocks, canvas_length)

    # 3. corrupt
    if t_override is None:
        t = config.eps + (1 - config.eps) * torch.rand(batch_size, blocks, device=device, generator=generator)
    else:
        t = torch.full((batch_size, blocks), float(t_override), device=device)
    noisy = corrupt(clean, t, text_config.vocab_size, generator)

    # 1. encode the clean prefix (only as far as the decoder needs unless the AR loss reads it all)
    needed = input_ids.shape[1] if config.ar_weight > 0 else int(starts[block_valid].max())
    encoder_hidden, prefix = encode_prefix(base, input_ids[:, :max(needed, 1)])

    # 5. self-conditioning: a no-grad first pass for the examples drawn to use it
    canvas = noisy.flatten(1)
    signal = None
    if config.self_conditioning_p > 0:
        signal = self_conditioning_signal(base, canvas, starts, prefix, t, config, generator)

    # 4. denoise
    hidden = decode_canvases(base, canvas, starts, prefix, signal).view(batch_size, blocks, canvas_length, -1)

    # 6. losses, never holding more than one chunk of vocabulary-sized logits
    supervised = block_valid[:, :, None].expand(-1, -1, canvas_length)
    diffusion_loss = chunked_cross_entropy(base, hidden[supervised], clean[supervised])
    loss = diffusion_loss
    ar_loss = None
    if config.ar_weight > 0:
        ar_loss = _encoder_next_token_loss(base, encoder_hidden, input_ids, prompt_lengths,
                                           batch.response_lengths.to(device))
        loss = loss + config.ar_weight * ar_loss
    return ObjectiveOutput(loss=loss, diffusion_loss=diffusion_loss.detach(),
                           ar_loss=None if ar_loss is None else ar_loss.detach(),
                           mean_t=t[block_valid].mean().detach(), block_index=block_index, block_valid=block_valid,
                           noisy_canvas=noisy, clean_canvas=clean,
                           canvas_logits=softcapped_logits(base, hidden) if return_logits else None)


def _encoder_next_token_loss(base, hidden, input_ids, prompt_lengths, response_lengths) -> torch.Tensor:
    """Next-token cross-entropy of the encoder on the response tokens (predicted from the position before)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    is_target = (positions >= prompt_lengths[:, None]) & (positions < (prompt_lengths + response_lengths)[:, None])
    rows, targets = is_target.nonzero(as_tuple=True)
    return chunked_cross_entropy(base, hidden[rows, targets - 1], input_ids[rows, targets])
