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
5. With probability `self_conditioning_p` per example, a first no-grad decoder pass produces logits that are fed
   back as `self_conditioning_logits` to the second pass (only the chosen examples run the first pass).
6. Loss = flat cross-entropy over every supervised canvas position (EOS fill included, no 1/t weight)
   + `ar_weight` * next-token cross-entropy of the encoder over the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObjectiveConfig:
    """Knobs of the objective (the recipe's `train` section holds them)."""

    eps: float = 1e-3
    self_conditioning_p: float = 0.5
    ar_weight: float = 1.0
    block_selection: Literal["random", "all"] = "random"
    canvas_samples: int = 1  # independent corruptions of each chosen block, sharing one encoder pass


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
    canvas_logits: torch.Tensor  # (B, K, C, V) logits of the denoised blocks
    block_index: torch.Tensor  # (B, K) which response block each canvas is
    block_valid: torch.Tensor  # (B, K) False for padding blocks in `all` mode
    noisy_canvas: torch.Tensor  # (B, K, C) what the decoder read
    clean_canvas: torch.Tensor  # (B, K, C)


def unwrap_model(model):
    """The `DiffusionGemmaForBlockDiffusion` under PEFT / DDP / compile wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "lm_head"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class PrefixKV:
    """A KV prefix in the shape DiffusionGemma's layers read (`layers[i].keys/.values`, (B, heads, L, dim)).

    The encoder appends to it through `update` (the `Cache` method its attention calls); the decoder only reads.
    Unlike `DynamicCache(config=...)` it never crops sliding-window layers: masks apply the window instead, so
    training sees exactly the positions inference would.
    """

    is_compileable = False

    def __init__(self, layers: list[SimpleNamespace] | None = None):
        self.layers = layers or []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(SimpleNamespace(keys=None, values=None))
        layer = self.layers[layer_idx]
        if layer.keys is None:
            layer.keys, layer.values = keys, values
        else:
            layer.keys = torch.cat([layer.keys, keys], dim=-2)
            layer.values = torch.cat([layer.values, values], dim=-2)
        return layer.keys, layer.values

    def select(self, rows: torch.Tensor) -> PrefixKV:
        return PrefixKV([SimpleNamespace(keys=layer.keys[rows], values=layer.values[rows]) for layer in self.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if len(self.layers) <= layer_idx or self.layers[layer_idx].keys is None:
            return 0
        return self.layers[layer_idx].keys.shape[-2]


# ----------------------------------------------------------------------------------------------------- masks
def encoder_masks(length: int, sliding_window: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Additive causal masks for the encoder (right padding needs none: pads come after every real token)."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    causal = key <= query
    sliding = causal & (query - key < sliding_window)
    return {"full_attention": _additive(causal, dtype)[None, None],
            "sliding_attention": _additive(sliding, dtype)[None, None]}


def decoder_masks(starts: torch.Tensor, canvas_length: int, prefix_length: int, sliding_window: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive masks (B, 1, K*C, prefix + K*C) for canvases whose blocks start at `starts` (B, K).

    A canvas sees prefix positions before its block start (sliding layers: the last `sliding_window - 1` of them,
    which is what the inference cache keeps) and its own canvas, bidirectionally; never other canvases.
    """
    batch, blocks = starts.shape
    device = starts.device
    query_start = starts.repeat_interleave(canvas_length, dim=1)[:, :, None]  # (B, KC, 1)
    prefix_pos = torch.arange(prefix_length, device=device)[None, None, :]
    full_prefix = prefix_pos < query_start
    sliding_prefix = full_prefix & (prefix_pos >= query_start - (sliding_window - 1))
    block_of = torch.arange(blocks, device=device).repeat_interleave(canvas_length)
    same_block = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)
    full = torch.cat([full_prefix, same_block], dim=-1)
    sliding = torch.cat([sliding_prefix, same_block], dim=-1)
    return {"full_attention": _additive(full, dtype)[:, None], "sliding_attention": _additive(sliding, dtype)[:, None]}


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the most negative finite value elsewhere (eager adds masks to scores, so a
    boolean mask would be silently wrong there)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------- pieces
def softcapped_logits(base, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + final logit soft-capping, exactly as `DiffusionGemmaForBlockDiffusion.forward` does."""
    logits = base.lm_head(hidden).float()
    cap = base.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


def encode_prefix(base, input_ids: torch.Tensor):
    """Run the encoder causally over `input_ids` (B, L); returns (last hidden state, full-length PrefixKV)."""
    length = input_ids.shape[1]
    dtype = base.model.decoder.embed_tokens.weight.dtype
    prefix = PrefixKV()
    outputs = base.model.encoder(
        input_ids=input_ids,
        attention_mask=encoder_masks(length, base.config.text_config.sliding_window, dtype, input_ids.device),
        past_key_values=prefix,
        position_ids=torch.arange(length, device=input_ids.device)[None],
        use_cache=True,
    )
    return outputs.last_hidden_state, prefix


def decode_canvases(base, canvas: torch.Tensor, starts: torch.Tensor, prefix: PrefixKV,
                    self_conditioning_logits: torch.Tensor | None = None,
                    self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder logits (B, K*C, V) for canvases (B, K*C) of blocks starting at `starts` (B, K)."""
    canvas_length = canvas.shape[1] // starts.shape[1]
    dtype = base.model.decoder.embed_tokens.weight.dtype
    masks = decoder_masks(starts, canvas_length, prefix.get_seq_length(),
                          base.config.text_config.sliding_window, dtype)
    positions = (starts[:, :, None] + torch.arange(canvas_length, device=canvas.device)).flatten(1)
    hidden = base.model.decoder(
        decoder_input_ids=canvas,
        past_key_values=prefix,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=masks,
        decoder_position_ids=positions,
    ).last_hidden_state
    return softcapped_logits(base, hidden)


def corrupt(clean: torch.Tensor, t: torch.Tensor, vocab_size: int, generator=None) -> torch.Tensor:
    """Replace each position of `clean` (..., C) by a uniform random token with probability t (...)."""
    replace = torch.rand(clean.shape, device=clean.device, generator=generator) < t[..., None]
    random_tokens = torch.randint(0, vocab_size, clean.shape, device=clean.device, generator=generator)
    return torch.where(replace, random_tokens, clean)


# ----------------------------------------------------------------------------------------------- the objective
def block_diffusion_loss(model, batch: BlockBatch, config: ObjectiveConfig, generator=None,
                         t_override: float | None = None) -> ObjectiveOutput:
    """Compute the block-diffusion loss for `batch` (see the module docstring).

    `t_override` fixes t for every block (tests use it to check the t -> 0 and t -> 1 limits).
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
    sc_logits = sc_mask = None
    if config.self_conditioning_p > 0:
        sc_mask = torch.rand(batch_size, device=device, generator=generator) < config.self_conditioning_p
        rows = sc_mask.nonzero().squeeze(1)
        if rows.numel():
            with torch.no_grad():
                first = decode_canvases(base, canvas[rows], starts[rows], prefix.select(rows))
            sc_logits = first.new_zeros(batch_size, *first.shape[1:])
            sc_logits[rows] = first
            sc_logits = sc_logits.to(base.model.decoder.embed_tokens.weight.dtype)
        else:
            sc_mask = None

    # 4. denoise
    logits = decode_canvases(base, canvas, starts, prefix, sc_logits, sc_mask)
    logits = logits.view(batch_size, blocks, canvas_length, -1)

    # 6. losses
    supervised = block_valid[:, :, None].expand(-1, -1, canvas_length)
    diffusion_loss = F.cross_entropy(logits[supervised], clean[supervised])
    loss = diffusion_loss
    ar_loss = None
    if config.ar_weight > 0:
        ar_loss = _encoder_next_token_loss(base, encoder_hidden, input_ids, prompt_lengths,
                                           batch.response_lengths.to(device))
        loss = loss + config.ar_weight * ar_loss
    return ObjectiveOutput(loss=loss, diffusion_loss=diffusion_loss.detach(),
                           ar_loss=None if ar_loss is None else ar_loss.detach(),
                           mean_t=t[block_valid].mean().detach(), canvas_logits=logits, block_index=block_index,
                           block_valid=block_valid, noisy_canvas=noisy, clean_canvas=clean)


def _encoder_next_token_loss(base, hidden, input_ids, prompt_lengths, response_lengths) -> torch.Tensor:
    """Next-token cross-entropy of the encoder on the response tokens (predicted from the position before)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    is_target = (positions >= prompt_lengths[:, None]) & (positions < (prompt_lengths + response_lengths)[:, None])
    rows, targets = is_target.nonzero(as_tuple=True)
    logits = softcapped_logits(base, hidden[rows, targets - 1])
    return F.cross_entropy(logits, input_ids[rows, targets])
