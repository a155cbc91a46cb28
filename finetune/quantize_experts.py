"""4-bit experts: DiffusionGemma's 3-D expert tensors (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)) stored in
NF4 by bitsandbytes, computed one routed expert at a time.

bitsandbytes' 4-bit loading quantizes `nn.Linear` modules only; the experts (~90% of the 26B model's weights) are
plain 3-D Parameters. `quantize_experts` stores each of them through bitsandbytes' own parametrization
(`bitsandbytes.nn.parametrize.replace_parameter_4bit`: NF4, blocksize 64, double quantization), so the packed
data, its `QuantState` and the state-dict hook are the library's. Encoder and decoder layers hold the same expert
Parameters in separate module objects: the decoder layer is first pointed at the encoder layer's `experts` module
(after checking that they hold the same Parameters), so one quantized copy exists and both passes use it.

Compute: HF's experts loop reads `self.gate_up_proj[expert_idx]` once per routed expert, and a parametrization
dequantizes the whole 3-D tensor at every read (E times per layer forward; with bitsandbytes' cache, once per
forward, but then autograd keeps the whole dequantized tensor alive until backward through the per-expert views
the linears save). So the quantized module gets its own forward (the same loop as HF's) whose linears are
`_ExpertLinear`: it dequantizes one expert's slice of the packed data (its own NF4 blocks; their double-quantized
scales dequantized for that slice only) with bitsandbytes' `dequantize_4bit`, multiplies, and frees it; backward
dequantizes the slice again (the weights are frozen: only the input gets a gradient), so nothing dequantized is
kept between forward and backward. The transient per layer is one expert's dequantized matrix (plus its
float32 scales): at the released shape 2 x 704 x 2816 bf16 = 7.9 MB, against 1.52 GB for a whole layer.

Full-precision parts (router, self-conditioning, norms, embeddings, vision tower) are untouched.

Loading onto an accelerator (`quantize_experts(model, device=...)`, as `load_in_4bit` on a GPU calls it): the
model arrives with its 16-bit experts in CPU memory (the loader stages the checkpoint there: safetensors maps the
file, so matching-dtype tensors are file pages, not copies) and each expert tensor is copied to the device alone,
quantized there (so bitsandbytes creates the packed data and its `QuantState` on the device) and its 16-bit
copies dropped before the next one is copied. The device therefore never holds more than one 16-bit expert tensor
(<= one layer's experts, 1.0 GB of a 1.5 GB layer at the released shape) on top of the NF4 ones. `module.to()`
does not move a parametrization's `QuantState`, hence quantizing in place on the device rather than moving NF4
experts afterwards; `check_device` verifies that packed data and state agree.
"""

from __future__ import annotations

import types

import torch

from dgemma_ft.errors import UserError
from dgemma_ft.plumbing import unwrap_model

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64
DOUBLE_QUANT = True


def _layer_pairs(model):
    base = unwrap_model(model)
    inner = base.model
    return list(zip(inner.encoder.language_model.layers, inner.decoder.layers))


def is_quantized(experts) -> bool:
    parametrizations = getattr(experts, "parametrizations", None)
    return parametrizations is not None and all(name in parametrizations for name in EXPERT_TENSORS)


def share_decoder_experts(model) -> int:
    """Point each decoder layer's `experts` at its encoder layer's module (they hold the same Parameters, as HF
    ties them); returns how many were re-pointed."""
    count = 0
    for encoder_layer, decoder_layer in _layer_pairs(model):
        encoder, decoder = encoder_layer.experts, decoder_layer.experts
        if encoder is decoder:
            continue
        if is_quantized(encoder) or is_quantized(decoder):
            raise UserError("the encoder and decoder experts were quantized separately; share them before "
                            "quantizing (quantize_experts does)")
        for name in EXPERT_TENSORS:
            a, b = getattr(encoder, name), getattr(decoder, name)
            if a is not b and not (a.shape == b.shape and torch.equal(a, b)):
                raise UserError("the encoder and decoder of this model do not share their expert weights; "
                                "4-bit experts need one shared copy (was it saved with untied weights?)")
        decoder_layer.experts = encoder
        count += 1
    return count


def quantize_experts(model, blocksize: int = BLOCKSIZE, double_quant: bool = DOUBLE_QUANT,
                     device: torch.device | str | None = None) -> int:
    """Store every text layer's expert tensors in NF4 (one copy shared by encoder and decoder) and install the
    per-expert forward. Idempotent; returns the number of expert modules quantized now.

    `device`: where the NF4 experts go. None quantizes each tensor where it is. Otherwise each 16-bit tensor is
    copied to `device` on its own, quantized there and its copies dropped before the next (see the module
    docstring): at most one 16-bit expert tensor is on the device at a time."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit  # optional: bitsandbytes

    target = torch.device(device) if device is not None else None
    share_decoder_experts(model)  # first, so the 16-bit tensors are freed as soon as each is quantized
    count = 0
    for encoder_layer, _ in _layer_pairs(model):
        experts = encoder_layer.experts
        if is_quantized(experts):
            continue
        for name in EXPERT_TENSORS:
            parameter = getattr(experts, name)
            per_expert = parameter[0].numel()
            if per_expert % (2 * blocksize):
                raise UserError(f"experts.{name}: {per_expert} weights per expert is not a multiple of "
                                f"{2 * blocksize}; 4-bit experts need whole NF4 blocks per expert")
            if target is not None:
                # the module's only reference to the staged tensor is replaced; `parameter` is dropped too
                setattr(experts, name, torch.nn.Parameter(_to_device(parameter, target), requires_grad=False))
            del parameter
            replace_parameter_4bit(experts, name, compress_statistics=double_quant, quant_type="nf4",
                                   blocksize=blocksize)
        experts.forward = types.MethodType(_nf4_experts_forward, experts)
        count += 1
    if target is not None:
        check_device(model, target)
    return count


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One staged 16-bit expert tensor on `device` (always a new copy, so the staged one can be freed)."""
    return tensor.detach().to(device, copy=True)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_device(model, device: torch.device | str) -> None:
    """Every NF4 expert tensor's packed data and its whole `QuantState` (scales, code, nested state) on `device`."""
    device = torch.device(device)
    for encoder_layer, decoder_layer in _layer_pairs(model):
        experts = encoder_layer.experts
        if not is_quantized(experts) or decoder_layer.experts is not experts:
            raise UserError("4-bit experts: a layer's experts are not quantized once and shared by encoder and "
                            "decoder")
        for name in EXPERT_TENSORS:
            packed, state = _state(experts, name)
            tensors = [packed, state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
            wrong = {str(t.device) for t in tensors if not _same_device(t.device, device)}
            if wrong:
                raise UserError(f"4-bit experts: experts.{name} has NF4 data or quantization state on {wrong}, "
                                f"not on {device}")


# --------------------------------------------------------------------------------------- per-expert compute
def _state(experts, name: str):
    parametrization = experts.parametrizations[name]
    return parametrization.original, parametrization[0].quant_state


def _absmax(state, first: int, last: int) -> torch.Tensor:
    """Float32 scales of NF4 blocks [first, last), dequantizing only the nested blocks that cover them."""
    if not state.nested:
        return state.absmax[first:last].float()
    from bitsandbytes import functional as F  # optional: bitsandbytes

    nested = state.state2
    start, stop = first // nested.blocksize, -(-last // nested.blocksize)
    piece = state.absmax[start * nested.blocksize:min(stop * nested.blocksize, state.absmax.numel())]
    sub = F.QuantState(absmax=nested.absmax[start:stop], code=nested.code, blocksize=nested.blocksize,
                       dtype=torch.float32)
    values = F.dequantize_blockwise(piece, sub)
    offset = first - start * nested.blocksize
    return (values[offset:offset + last - first] + state.offset).float()


def _dequantize(packed, state, first_block: int, numel: int, shape) -> torch.Tensor:
    """`numel` weights from NF4 block `first_block` on, as a tensor of `shape`. Dequantized as a flat vector:
    bitsandbytes 0.50's CPU kernel gives wrong values for a 2-D or 3-D shape whose last dimension is smaller
    than the blocksize (e.g. a (E, H, 32) tensor at blocksize 64); flat, it matches the generic kernel."""
    blocks = -(-numel // state.blocksize)
    data = packed.view(-1)[first_block * state.blocksize // 2:(first_block * state.blocksize + numel + 1) // 2]
    absmax = _absmax(state, first_block, first_block + blocks)
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(data, absmax, state.blocksize, state.quant_type,
                                                          (numel,), state.dtype)
    return flat.view(shape)


def expert_weight(experts, name: str, index: int) -> torch.Tensor:
    """One expert's matrix of `name`, dequantized from its own NF4 blocks (the packed storage is not touched)."""
    packed, state = _state(experts, name)
    shape = tuple(state.shape[1:])
    numel = shape[0] * shape[1]
    return _dequantize(packed, state, index * numel // state.blocksize, numel, shape)


class _ExpertLinear(torch.autograd.Function):
    """`x @ W[index].T` with W stored in NF4: dequantized for the product and again in backward, never kept."""

    @staticmethod
    def forward(ctx, x, experts, name, index):
        ctx.experts, ctx.name, ctx.index, ctx.x_dtype = experts, name, index, x.dtype
        weight = expert_weight(experts, name, index)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = expert_weight(ctx.experts, ctx.name, ctx.index).to(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None, None, None


def _nf4_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """HF's `DiffusionGemmaTextExperts.forward` loop, with the linears of `_ExpertLinear`."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit.flatten().tolist():
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = _ExpertLinear.apply(current_state, self, "gate_up_proj", expert_idx).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = _ExpertLinear.apply(current_hidden_states, self, "down_proj", expert_idx)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def dequantized_experts(experts) -> dict[str, torch.Tensor]:
    """The whole dequantized tensors of one quantized experts module (for merging and checks)."""
    result = {}
    for name in EXPERT_TENSORS:
        packed, state = _state(experts, name)
        result[name] = _dequantize(packed, state, 0, state.shape.numel(), state.shape)
    return result


def nf4_round_trip(tensor: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = DOUBLE_QUANT):
    """`tensor` quantized to NF4 as `quantize_experts` stores it, then dequantized."""
    from bitsandbytes import functional as F  # optional: bitsandbytes

    packed, state = F.quantize_4bit(tensor.detach(), blocksize=blocksize, compress_statistics=double_quant,
                                    quant_type="nf4")
    return _dequantize(packed, state, 0, tensor.numel(), tensor.shape)
