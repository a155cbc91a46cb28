"""4-bit experts: `load_in_4bit` also stores the 3-D expert tensors in NF4 (bitsandbytes' parametrization, one copy
shared by encoder and decoder), computes one routed expert at a time, and trains a LoRA on top.

Loading onto a GPU stages the checkpoint on the CPU and quantizes the experts onto the device one tensor at a time
(`model_loading._place_4bit`). With no GPU here, the `staged` tests force that path with the CPU as the target:
every expert tensor is still copied to the "device" (`quantize_experts._to_device` always copies), so the copies,
their NF4 results and their release are what a GPU would hold, and they are counted."""

import copy
import gc
import weakref

import pytest
import torch

bitsandbytes = pytest.importorskip("bitsandbytes")

from bitsandbytes import functional as BF  # noqa: E402

from dgemma_ft.errors import UserError  # noqa: E402
from dgemma_ft.finetune import model_loading  # noqa: E402
from dgemma_ft.finetune import quantize_experts as qe  # noqa: E402
from dgemma_ft.finetune.estimate import nf4_bytes  # noqa: E402
from dgemma_ft.finetune.lora import attach_lora  # noqa: E402
from dgemma_ft.finetune.model_loading import load_model  # noqa: E402
from dgemma_ft.finetune.objective import BlockBatch, ObjectiveConfig, block_diffusion_loss  # noqa: E402
from dgemma_ft.finetune.recipe import ModelSection  # noqa: E402
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model  # noqa: E402
from dgemma_ft.memory_meter import PeakMemory  # noqa: E402

SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, global_head_dim=64,
            moe_intermediate_size=64, num_experts=8, top_k_experts=2)


def layers(model):
    inner = model.model
    return list(zip(inner.encoder.language_model.layers, inner.decoder.layers))


def reference_round_trip(tensor):
    """NF4 (blocksize 64, double quantization) and back through bitsandbytes' public API, on the flat tensor."""
    packed, state = BF.quantize_4bit(tensor.detach().reshape(-1), blocksize=64, compress_statistics=True,
                                     quant_type="nf4")
    return BF.dequantize_4bit(packed, state).view(tensor.shape)


def inputs():
    draw = torch.Generator().manual_seed(0)
    return torch.randint(6, 90, (2, 10), generator=draw), torch.randint(0, 90, (2, 32), generator=draw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-experts")
    model, tokenizer = build_tiny_model(TinySpec(**SPEC))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_4bit(path):
    return load_model(ModelSection(name=str(path), load_in_4bit=True, dtype="float32")).model


def load_staged(path, monkeypatch):
    """The accelerator path (CPU staging, experts quantized onto the device one tensor at a time), on the CPU."""
    with monkeypatch.context() as patch:
        patch.setattr(model_loading, "_stage_on_cpu", lambda device: True)
        return load_4bit(path)


@pytest.fixture(params=["direct", "staged"])
def load(request, monkeypatch):
    """Each 4-bit loading path: straight onto the device (CPU loading), or staged on the CPU (GPU loading)."""
    if request.param == "direct":
        return load_4bit
    return lambda path: load_staged(path, monkeypatch)


def test_4bit_experts_compute_the_nf4_round_trip(saved, monkeypatch, load):
    """Same 4-bit linears on both sides; one side's experts in NF4, the other's replaced by their round trip."""
    quantized = load(saved)
    monkeypatch.setattr(qe, "quantize_experts", lambda model, **kwargs: 0)  # linears only, as before 4-bit experts
    reference = load_4bit(saved)
    monkeypatch.undo()
    assert all(qe.is_quantized(encoder.experts) for encoder, _ in layers(quantized))
    assert not any(qe.is_quantized(encoder.experts) for encoder, _ in layers(reference))
    with torch.no_grad():
        for encoder, decoder in layers(reference):
            assert encoder.experts.gate_up_proj is decoder.experts.gate_up_proj
            for name in qe.EXPERT_TENSORS:
                parameter = getattr(encoder.experts, name)
                parameter.copy_(reference_round_trip(parameter))
    ids, canvas = inputs()
    with torch.no_grad():
        four = quantized(input_ids=ids, decoder_input_ids=canvas).logits
        expected = reference(input_ids=ids, decoder_input_ids=canvas).logits
    assert torch.isfinite(four).all()
    torch.testing.assert_close(four, expected, atol=1e-4, rtol=0)


def test_experts_only_model_matches_and_per_expert_slices_are_exact():
    """On a model whose linears stay fp32 (only experts quantized), and per expert slice against the whole."""
    model, _ = build_tiny_model(TinySpec(**SPEC))
    model.eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for encoder, _ in layers(reference):
            for name in qe.EXPERT_TENSORS:
                getattr(encoder.experts, name).copy_(reference_round_trip(getattr(encoder.experts, name)))
    assert qe.quantize_experts(model) == SPEC["num_hidden_layers"]
    assert qe.quantize_experts(model) == 0  # idempotent
    ids, canvas = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=canvas).logits,
                                   reference(input_ids=ids, decoder_input_ids=canvas).logits, atol=1e-4, rtol=0)
    for (encoder, _), (ref_encoder, _) in zip(layers(model), layers(reference)):
        whole = qe.dequantized_experts(encoder.experts)
        for name in qe.EXPERT_TENSORS:
            assert torch.equal(whole[name], getattr(ref_encoder.experts, name))
            for index in range(SPEC["num_experts"]):
                assert torch.equal(qe.expert_weight(encoder.experts, name, index), whole[name][index])


def test_narrow_experts_dequantize_correctly():
    """bitsandbytes 0.50's CPU kernel is wrong for a last dimension under the blocksize; the flat path is not."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    tensor = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1))
    packed, state = BF.quantize_4bit(tensor, blocksize=64, compress_statistics=False, quant_type="nf4")
    generic = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, _get_4bit_code("nf4", packed.device), 64,
                                       tensor.shape, torch.float32)
    torch.testing.assert_close(qe.nf4_round_trip(tensor, double_quant=False), generic, atol=0, rtol=0)


def test_encoder_and_decoder_share_one_quantized_copy(saved, load):
    model = load(saved)
    packed = {}
    for encoder, decoder in layers(model):
        assert encoder.experts is decoder.experts
        for name in qe.EXPERT_TENSORS:
            original = encoder.experts.parametrizations[name].original
            assert original.dtype == torch.uint8 and not original.requires_grad
            packed[id(original)] = original
    expert_params = {id(p): p for n, p in model.named_parameters(remove_duplicate=False) if ".experts." in n}
    assert expert_params.keys() == packed.keys()  # every path to an expert tensor reaches the one packed copy
    assert len(packed) == 2 * SPEC["num_hidden_layers"]
    stored = 0
    for encoder, _ in layers(model):
        for name in qe.EXPERT_TENSORS:
            original, state = qe._state(encoder.experts, name)
            assert state.blocksize == 64 and state.nested and state.quant_type == "nf4"
            tensors = [original, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
            size = sum(t.numel() * t.element_size() for t in tensors)
            assert size == nf4_bytes(state.shape.numel())  # the estimate's formula is bitsandbytes' layout
            stored += size
    hidden, inter, experts = SPEC["hidden_size"], SPEC["moe_intermediate_size"], SPEC["num_experts"]
    dense = SPEC["num_hidden_layers"] * experts * 3 * inter * hidden * 4
    assert stored < dense / 6  # fp32 -> NF4: ~7.5x smaller, counted once for both passes


def test_router_self_conditioning_and_embeddings_stay_full_precision(saved, load):
    model = load(saved)
    for encoder, decoder in layers(model):
        assert type(encoder.router.proj) is torch.nn.Linear and encoder.router.proj.weight.dtype == torch.float32
        assert encoder.router.per_expert_scale.dtype == torch.float32
        assert decoder.router.proj.weight is encoder.router.proj.weight
        assert encoder.pre_feedforward_layernorm_2.weight.dtype == torch.float32
    inner = model.model
    assert type(inner.decoder.self_conditioning.gate_proj) is torch.nn.Linear
    assert all(p.dtype == torch.float32 for p in inner.decoder.self_conditioning.parameters())
    assert inner.decoder.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "vision" in n)
    quantized = {n for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert quantized and all(".experts." in n or "_proj" in n for n in quantized)
    assert not any("router" in n or "self_conditioning" in n or "embed" in n for n in quantized)


def test_lora_trains_on_4bit_experts_with_checkpointing(saved):
    model = load_4bit(saved)
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base = peft_model.get_base_model()
    assert base.model.decoder.layers[0].gradient_checkpointing
    peft_model.train()
    draw = torch.Generator().manual_seed(3)
    batch = BlockBatch(torch.randint(6, 90, (2, 42), generator=draw), torch.tensor([10, 10]),
                       torch.tensor([20, 20]), torch.tensor([1, 1]))
    config = ObjectiveConfig(self_conditioning_p=1.0, ar_weight=1.0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(5):
        torch.manual_seed(0)  # the same noise each step: the loss of one fixed problem falls
        loss = block_diffusion_loss(peft_model, batch, config).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for n, p in peft_model.named_parameters() if ".experts." in n)


def _experts_pass(module, hidden, index, weights):
    with PeakMemory() as meter:
        out = module(hidden, index, weights)
        kept = meter.current_bytes
        out.square().sum().backward()
    return meter.peak_bytes, kept, hidden.grad


def test_experts_transient_is_one_expert_not_one_layer():
    """Forward and backward of one layer's experts: beyond what the bf16/fp32 module needs, the 4-bit module
    holds at most one expert's dequantized matrices (and their scales) at once, and keeps nothing dequantized
    for backward. (The reference runs HF's eager loop; its default `grouped_mm` reads the whole 3-D tensors.)"""
    spec = dict(SPEC, hidden_size=128, moe_intermediate_size=128, num_experts=16)
    model, _ = build_tiny_model(TinySpec(**spec))
    reference = copy.deepcopy(model.model.encoder.language_model.layers[0].experts)
    quantized = model.model.encoder.language_model.layers[0].experts
    qe.quantize_experts(model)
    with torch.no_grad():
        for name, value in qe.dequantized_experts(quantized).items():
            getattr(reference, name).copy_(value)
    reference.requires_grad_(False)
    reference.config._experts_implementation = "eager"  # HF's per-expert loop, as the 4-bit forward runs it
    draw = torch.Generator().manual_seed(0)
    tokens = 64
    index = torch.stack([torch.randperm(16, generator=draw)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=draw)
    hidden = torch.randn(tokens, spec["hidden_size"], generator=draw)
    x_ref, x_q = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    peak_ref, kept_ref, grad_ref = _experts_pass(reference, x_ref, index, weights)
    peak_q, kept_q, grad_q = _experts_pass(quantized, x_q, index, weights)
    torch.testing.assert_close(grad_q, grad_ref, atol=1e-5, rtol=1e-5)
    hidden_size, inter = spec["hidden_size"], spec["moe_intermediate_size"]
    one_expert = 2 * inter * hidden_size * 4  # the larger matrix (gate_up), fp32
    scales = 2 * (2 * inter * hidden_size // 64) * 4 + 2 * 256 * 4  # its float32 block scales, nested pieces
    whole_layer = 16 * 3 * inter * hidden_size * 4
    transient = peak_q - peak_ref
    print(f"experts fwd+bwd peak: fp32 module {peak_ref} B, 4-bit {peak_q} B (+{transient} B); one expert's "
          f"gate_up {one_expert} B; whole layer dequantized {whole_layer} B")
    assert kept_q == kept_ref  # nothing dequantized is saved for backward
    assert transient <= one_expert + scales
    assert transient < whole_layer / 8


def test_staged_load_holds_one_16bit_expert_tensor_at_a_time(saved, monkeypatch):
    """The accelerator path: `from_pretrained` reads onto the CPU, then each expert tensor is copied to the device,
    quantized there and dropped before the next: the device never holds more than one 16-bit expert tensor (so
    less than one layer's) besides the NF4 ones, the staged CPU tensors are freed, no accelerate hooks are left,
    and the model computes exactly what the direct path's does."""
    from transformers import DiffusionGemmaForBlockDiffusion

    device_maps, copies, live_before, staged = [], [], [], []
    meter = {}
    original_load = DiffusionGemmaForBlockDiffusion.from_pretrained
    original_copy, original_quantize = qe._to_device, qe.quantize_experts

    def from_pretrained(cls, *args, **kwargs):
        device_maps.append(kwargs.get("device_map"))
        return original_load(*args, **kwargs)

    def to_device(tensor, device):
        assert tensor.dim() == 3
        live_before.append(sum(ref() is not None for ref in copies))  # earlier device copies still alive
        result = original_copy(tensor, device)
        copies.append(weakref.ref(result))
        return result

    def quantize(model, **kwargs):
        assert kwargs.get("device") is not None
        for encoder, _ in layers(model):
            staged.extend(weakref.ref(getattr(encoder.experts, name)) for name in qe.EXPERT_TENSORS)
        with PeakMemory() as measured:
            result = original_quantize(model, **kwargs)
            gc.collect()
        meter.update(peak=measured.peak_bytes, kept=measured.current_bytes)
        return result

    monkeypatch.setattr(DiffusionGemmaForBlockDiffusion, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(qe, "_to_device", to_device)
    monkeypatch.setattr(qe, "quantize_experts", quantize)
    model = load_staged(saved, monkeypatch)
    monkeypatch.undo()
    gc.collect()

    assert device_maps == [{"": "cpu"}]  # staged in CPU memory, one device: no accelerate dispatch
    assert len(copies) == 2 * SPEC["num_hidden_layers"] and live_before == [0] * len(copies)
    assert all(ref() is None for ref in copies + staged)  # device copies and staged CPU tensors freed
    assert not any(hasattr(module, "_hf_hook") for module in model.modules())
    assert len(set(getattr(model, "hf_device_map", {"": "cpu"}).values())) == 1
    qe.check_device(model, "cpu")

    hidden, inter, experts = SPEC["hidden_size"], SPEC["moe_intermediate_size"], SPEC["num_experts"]
    gate_up = experts * 2 * inter * hidden * 4  # the larger fp32 expert tensor
    one_layer = experts * 3 * inter * hidden * 4
    nf4 = sum(nf4_bytes(qe._state(encoder.experts, name)[1].shape.numel())
              for encoder, _ in layers(model) for name in qe.EXPERT_TENSORS)
    print(f"quantize onto the device: peak {meter['peak']} B, kept {meter['kept']} B (NF4 experts {nf4} B); "
          f"one 16-bit gate_up {gate_up} B, one layer {one_layer} B, all layers "
          f"{SPEC['num_hidden_layers'] * one_layer} B")
    codes = 2 * SPEC["num_hidden_layers"] * 16 * 4  # NF4 code tables: bitsandbytes may hand out a cached one
    assert nf4 - codes <= meter["kept"] <= nf4  # only the NF4 experts stay on the device
    assert meter["peak"] <= nf4 + one_layer  # never more than one layer's 16-bit experts besides them
    assert meter["peak"] <= nf4 + gate_up + gate_up // 4  # in fact one tensor and its quantization temporaries

    direct = load_4bit(saved)
    ids, canvas = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=canvas).logits,
                                   direct(input_ids=ids, decoder_input_ids=canvas).logits, atol=0, rtol=0)


def test_check_device_finds_state_off_the_device():
    model, _ = build_tiny_model(TinySpec(**SPEC))
    qe.quantize_experts(model)
    qe.check_device(model, "cpu")
    with pytest.raises(UserError, match="not on meta"):
        qe.check_device(model, "meta")
