"""How the kit drives DiffusionGemma's encoder and decoder, shared by the objective (training) and the sampler
(inference) so that each rule exists once:

- `PrefixKV`: the encoder's KV prefix, kept at full length (sliding windows are applied by the masks).
- `encoder_masks` / `decoder_masks`: the additive attention masks (causal encoder; a canvas sees the prefix before
  its block start, the last `sliding_window - 1` of it for sliding layers, and its own canvas bidirectionally).
- `logit_chunks`: soft-capped logits over the vocabulary, a bounded number of positions at a time, so that no
  (batch x canvas x 262,144) float32 tensor is ever built.
- `soft_embeddings` + `run_decoder`: self-conditioning fed back as soft embeddings (batch x canvas x hidden),
  computed chunk by chunk exactly as HF's decoder would compute them from full logits.

Everything is built on the device of the tensors it is given (the model's).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# At most this many float32 logits (batch positions x vocabulary) exist at once: 256 MB, i.e. 256 positions of
# the released 262,144-token vocabulary per chunk.
LOGIT_CHUNK_ELEMENTS = 2 ** 26


def unwrap_model(model):
    """The `DiffusionGemmaForBlockDiffusion` under PEFT / DDP / FSDP / compile wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "lm_head"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


DEFAULT_TEMPERATURES = (0.4, 0.8)  # the released generation config's t_min, t_max


def temperature_range(model) -> tuple[float, float]:
    """(t_min, t_max) of the model's sampler: it divides step logits by a temperature going from t_max (pure
    noise) to t_min (clean), and feeds those scaled logits back as self-conditioning."""
    generation = getattr(unwrap_model(model), "generation_config", None)
    t_min = getattr(generation, "t_min", None)
    t_max = getattr(generation, "t_max", None)
    return (float(t_min if t_min is not None else DEFAULT_TEMPERATURES[0]),
            float(t_max if t_max is not None else DEFAULT_TEMPERATURES[1]))


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of the decoder layers (HF never checkpoints the encoder layers, which write the
    prefix), under the name this transformers version uses."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_device(model) -> torch.device:
    """Where the model's weights live (the head's device: the last stage under any device map)."""
    return unwrap_model(model).lm_head.weight.device


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
def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the most negative finite value elsewhere (eager adds masks to scores, so a
    boolean mask would be silently wrong there)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _by_layer_type(full: torch.Tensor, sliding: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"full_attention": additive(full, dtype)[:, None], "sliding_attention": additive(sliding, dtype)[:, None]}


def encoder_masks(query_pos: torch.Tensor, query_ok: torch.Tensor, key_pos: torch.Tensor, key_ok: torch.Tensor,
                  window: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Causal masks (B, 1, n, P) for encoder queries at `query_pos` (B, n) over keys at `key_pos` (B, P), whose
    last n entries are the queries themselves. A query sees valid keys at or before its position (sliding layers:
    fewer than `window` positions back). A padding query sees only itself, so no softmax row is empty."""
    keys = key_pos[:, None, :]
    query = query_pos[:, :, None]
    causal = key_ok[:, None, :] & (keys <= query)
    own_slot = key_pos.shape[1] - query_pos.shape[1] + torch.arange(query_pos.shape[1], device=key_pos.device)
    is_self = torch.arange(key_pos.shape[1], device=key_pos.device)[None, None, :] == own_slot[None, :, None]
    causal = causal | (~query_ok[:, :, None] & is_self)
    sliding = causal & ((query - keys < window) | ~query_ok[:, :, None])
    return _by_layer_type(causal, sliding, dtype)


def causal_encoder_masks(length: int, window: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """`encoder_masks` for one unpadded sequence 0..length-1 (broadcast over a right-padded batch: pads come after
    every real token, so causal attention never reads them)."""
    positions = torch.arange(length, device=device)[None]
    ok = torch.ones_like(positions, dtype=torch.bool)
    return encoder_masks(positions, ok, positions, ok, window, dtype)


def decoder_masks(key_pos: torch.Tensor, key_ok: torch.Tensor, starts: torch.Tensor, canvas_length: int,
                  window: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Masks (B, 1, K*C, P + K*C) for K canvases per row whose blocks start at `starts` (B, K), over prefix keys at
    `key_pos` (B, P) (`key_ok` marks real ones) followed by the canvases. A canvas sees prefix keys before its
    block start (sliding layers: the last `window - 1` of them, which is what the inference cache keeps) and its
    own canvas, bidirectionally; never another canvas."""
    batch, blocks = starts.shape
    device = starts.device
    query_start = starts.repeat_interleave(canvas_length, dim=1)[:, :, None]  # (B, KC, 1)
    keys = key_pos[:, None, :]
    full_prefix = key_ok[:, None, :] & (keys < query_start)
    sliding_prefix = full_prefix & (keys >= query_start - (window - 1))
    block_of = torch.arange(blocks, device=device).repeat_interleave(canvas_length)
    same_block = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)
    return _by_layer_type(torch.cat([full_prefix, same_block], dim=-1),
                          torch.cat([sliding_prefix, same_block], dim=-1), dtype)


# ---------------------------------------------------------------------------------------------------- logits
def softcapped_logits(base, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + final logit soft-capping in float32, exactly as `DiffusionGemmaForBlockDiffusion.forward` does.
    Full vocabulary for every row of `hidden`: use `logit_chunks` for many rows."""
    logits = base.lm_head(hidden).float()
    cap = base.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


def chunk_rows(vocab_size: int, chunk_elements: int | None = None) -> int:
    """Rows of logits per chunk under the element budget."""
    return max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // vocab_size)


def logit_chunks(base, hidden: torch.Tensor, chunk_elements: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, float32 soft-capped logits) for `hidden` flattened to (N, H), a bounded number of rows at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_rows(base.config.text_config.vocab_size, chunk_elements)
    for begin in range(0, flat.shape[0], step):
        rows = slice(begin, min(begin + step, flat.shape[0]))
        yield rows, softcapped_logits(base, flat[rows])


def _cross_entropy_sum(base, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(softcapped_logits(base, hidden), targets, reduction="sum")


def chunked_cross_entropy(base, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the soft-capped logits of `hidden` (N, H) against `targets` (N,), with at most one
    chunk of float32 logits alive: each chunk's logits are recomputed in backward instead of being kept
    (loss and gradients equal the plain computation; tests/test_memory_bounded.py)."""
    step = chunk_rows(base.config.text_config.vocab_size, chunk_elements)
    count = targets.shape[0]
    if count <= step:
        return _cross_entropy_sum(base, hidden, targets) / max(count, 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for begin in range(0, count, step):
        rows = slice(begin, min(begin + step, count))
        if torch.is_grad_enabled():
            part = checkpoint(_cross_entropy_sum, base, hidden[rows], targets[rows], use_reentrant=False)
        else:
            part = _cross_entropy_sum(base, hidden[rows], targets[rows])
        total = total + part
    return total / count


# ------------------------------------------------------------------------------------------ self-conditioning
def soft_embedding_rows(base, logits: torch.Tensor) -> torch.Tensor:
    """`softmax(logits) @ embeddings * scale` for rows of float32 logits, with the casts HF's decoder applies to
    `self_conditioning_logits` (stored in the model dtype, softmax in float32, matmul in the embedding dtype)."""
    embed = base.model.decoder.embed_tokens
    dtype = embed.weight.dtype
    probs = logits.to(dtype).softmax(dim=-1, dtype=torch.float32).to(dtype)
    return torch.matmul(probs, embed.weight) * embed.embed_scale.to(dtype)


def soft_embeddings(base, hidden: torch.Tensor, temperature: torch.Tensor | None = None,
                    chunk_elements: int | None = None) -> torch.Tensor:
    """Self-conditioning signal (..., H) from decoder hidden states (..., H), through the logits chunk by chunk.
    `temperature` (one per row of `hidden` flattened, or None) divides the logits first, as the sampler does."""
    flat_shape = hidden.shape[:-1]
    out = None
    scale = None if temperature is None else temperature.reshape(-1, 1)
    for rows, logits in logit_chunks(base, hidden, chunk_elements):
        if scale is not None:
            logits = logits / scale[rows]
        piece = soft_embedding_rows(base, logits)
        if out is None:
            out = piece.new_empty(flat_shape.numel(), piece.shape[-1])
        out[rows] = piece
    return out.view(*flat_shape, -1)


@contextlib.contextmanager
def _feed_soft_embeddings(base, signal: torch.Tensor | None):
    """Hand `signal` to the decoder's self-conditioning block in place of HF's own soft embeddings (which HF
    would compute from full-vocabulary logits; with no logits passed, HF hands it zeros)."""
    if signal is None:
        yield
        return
    fired = []

    def replace(module, args, kwargs):
        fired.append(True)
        if "self_conditioning_signal" in kwargs:
            return args, {**kwargs, "self_conditioning_signal": signal}
        return (args[0], signal, *args[2:]), kwargs

    handle = base.model.decoder.self_conditioning.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if not fired:
        raise RuntimeError("the decoder never called its self-conditioning block; this transformers version is not "
                           "supported (the self-conditioning signal would be lost)")


@functools.cache
def _prefix_keyword(module_class: type) -> str:
    """The forward keyword that takes the KV prefix: transformers 5.25 renamed `past_key_values` to `cache` (the
    old name warns on every forward and goes in 5.40); earlier versions know only the old one."""
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def run_decoder(base, canvas: torch.Tensor, prefix: PrefixKV, masks: dict[str, torch.Tensor],
                positions: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder hidden states (B, n, H) for `canvas` (B, n) over `prefix`, with `signal` (B, n, H) as the
    self-conditioning input (None: HF's zeros, the first denoising step)."""
    decoder = base.model.decoder
    with _feed_soft_embeddings(base, signal):
        return decoder(decoder_input_ids=canvas, decoder_attention_mask=masks, decoder_position_ids=positions,
                       **{_prefix_keyword(type(decoder)): prefix}).last_hidden_state


def run_encoder(base, tokens: torch.Tensor, prefix: PrefixKV, masks: dict[str, torch.Tensor],
                positions: torch.Tensor) -> torch.Tensor:
    """Append `tokens` (B, n) to `prefix` through the encoder; returns its last hidden states."""
    encoder = base.model.encoder
    return encoder(input_ids=tokens, attention_mask=masks, position_ids=positions, use_cache=True,
                   **{_prefix_keyword(type(encoder)): prefix}).last_hidden_state
