"""Multi-process training glue: FSDP2 for a model whose encoder and decoder share their weights, and a forward
that DDP and FSDP can see.

DiffusionGemma's encoder layer i and decoder layer i are different modules (different classes) holding the same
Parameters. FSDP2 refuses a Parameter that two FSDP groups can see, and accelerate's wrap policies would put the
two layers in different groups. So under FSDP this module shards the model itself, before accelerate sees it
(accelerate leaves an already sharded model alone):

- `share_layer_modules` points each decoder layer's parameter-holding submodules (projections, norms, router,
  experts, LoRA wrappers) at the encoder layer's module objects: the same Parameters as before, so the function
  is unchanged, but now one module object runs in both passes.
- `shard` makes one FSDP group per layer pair from those modules, one for the vision tower (never run for text,
  so never gathered), and the root group for the rest (embeddings tied to `lm_head`, final norms,
  self-conditioning). A group is gathered for each pass that uses it and freed after it.
- The decoder reads the encoder's per-layer keys and values, so a gradient can reach an encoder projection before
  it reaches the group's last output, where FSDP gathers the group for backward; `_gather_before_backward`
  registers FSDP's pre-backward hook on every module's output (without it, backward reads freed memory).

The objective calls the encoder, decoder and `lm_head` directly, never the model's `forward`, where FSDP hooks its
root and DDP arms its gradient all-reduce: without `forward_through`, DDP ranks silently train apart and FSDP fails.

Saving: `unsharded_for_saving` gathers the full weights into a parameterless copy of the model made before
sharding, so the run folder is written by the usual `save_pretrained` / PEFT code, with shared weights shared.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.tensor import DTensor

from dgemma_ft.errors import UserError
from dgemma_ft.plumbing import unwrap_model

SKELETON = "_dgemma_unsharded_skeleton"


# --------------------------------------------------------------------------------------------- the forward
def forward_through(model, compute):
    """Run `compute()` (returning an object with a `.loss`) as the forward of a DDP or FSDP `model`, so their
    forward hooks run around it; a plain model just runs `compute()`."""
    inner = _hooked_module(model)
    if inner is None:
        return compute()
    kept = {}

    def run():
        kept["out"] = compute()
        return kept["out"].loss

    with _forward_replaced(inner, run):
        loss = model()
    kept["out"].loss = loss  # FSDP may have registered backward hooks on the returned tensor
    return kept["out"]


def _hooked_module(model):
    """The module whose `forward` a DDP / FSDP wrapper calls, or None for a plain model."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDP1)):
        return model.module
    return model if isinstance(model, FSDPModule) else None


@contextlib.contextmanager
def _forward_replaced(module, function):
    had_own = "forward" in module.__dict__  # accelerate's dispatch hooks set an instance `forward`
    previous = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: function()
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


# ------------------------------------------------------------------------------------------------ sharding
def prepare_fsdp(trainer) -> None:
    """Under accelerate's FSDP, shard `trainer.model` in place as described above (before accelerate prepares
    it), after checking the plugin settings this model can use."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    accelerator = trainer.accelerator
    plugin = accelerator.state.fsdp_plugin
    _check_plugin(plugin)
    model = trainer.model
    if _is_quantized(model):
        raise UserError("FSDP: a quantized (4-bit, QLoRA) model cannot be sharded here; use DDP "
                        "(recipes/accelerate/ddp.yaml), which keeps a whole 4-bit copy on each GPU")
    setattr(trainer, SKELETON, parameterless_copy(model))
    if accelerator.mixed_precision != "no":
        _upcast_trainable(model)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and accelerator.parallelism_config is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    shard(model, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward,
          mp_policy=plugin.mixed_precision_policy, offload_policy=plugin.cpu_offload)


def _check_plugin(plugin) -> None:
    where = "(see recipes/accelerate/fsdp.yaml)"
    if plugin.fsdp_version != 2:
        raise UserError(f"FSDP: set fsdp_version: 2 {where}; FSDP1 cannot keep the encoder's and decoder's shared "
                        f"weights in one unit per layer")
    if plugin.activation_checkpointing:
        raise UserError(f"FSDP: set fsdp_activation_checkpointing: false and use train.gradient_checkpointing "
                        f"instead {where}")
    if plugin.cpu_ram_efficient_loading:
        raise UserError(f"FSDP: set fsdp_cpu_ram_efficient_loading: false {where}; every process loads the model")
    if not isinstance(plugin.reshard_after_forward, bool):
        raise UserError(f"FSDP: fsdp_reshard_after_forward must be true or false with fsdp_version: 2 {where}")


def _is_quantized(model) -> bool:
    return getattr(unwrap_model(model), "hf_quantizer", None) is not None or \
        any(type(p).__name__ == "Params4bit" for p in model.parameters())


def _upcast_trainable(model) -> None:
    """FSDP2 needs one dtype for the trainable Parameters of a group; with mixed precision they are kept in
    float32 (as accelerate does) and computed in the policy's dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def shard(model, mesh=None, reshard_after_forward: bool = True, mp_policy=None, offload_policy=None):
    """Apply FSDP2 in place: one group per encoder/decoder layer pair, one for the vision tower, then the root."""
    base = unwrap_model(model)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "offload_policy": offload_policy or OffloadPolicy()}
    for modules in share_layer_modules(base):
        fully_shard(modules, reshard_after_forward=reshard_after_forward, **kwargs)
        _gather_before_backward(modules)
    vision = [m for m in (getattr(base.model.encoder, "vision_tower", None),
                          getattr(base.model.encoder, "embed_vision", None))
              if m is not None and any(True for _ in m.parameters())]
    if vision:
        fully_shard(vision, reshard_after_forward=True, **kwargs)
    fully_shard(model, **kwargs)
    return model


def share_layer_modules(base) -> list[list[torch.nn.Module]]:
    """Point each decoder layer's parameter-holding submodules at the encoder layer's (they already share every
    Parameter); returns, per layer pair, the shared module objects (outermost ones only)."""
    groups = []
    for enc_layer, dec_layer in zip(base.model.encoder.language_model.layers, base.model.decoder.layers):
        shared: list[torch.nn.Module] = []
        inside: set[int] = set()
        for path, enc_module in _holding_parameters(enc_layer):
            dec_module = dec_layer.get_submodule(path)
            if dec_module is not enc_module:
                _check_same_parameters(path, enc_module, dec_module)
                _set_submodule(dec_layer, path, enc_module)
            if id(enc_module) not in inside:
                shared.append(enc_module)
                inside |= {id(m) for m in enc_module.modules()}
        groups.append(shared)
    return groups


def _holding_parameters(layer):
    """(path, module) for every submodule that holds Parameters itself, parents before children."""
    for path, module in layer.named_modules():
        if path and any(p is not None for p in module._parameters.values()):
            yield path, module


def _check_same_parameters(path: str, enc_module, dec_module) -> None:
    for name, param in enc_module._parameters.items():
        if param is not None and dec_module._parameters.get(name) is not param:
            raise UserError(f"FSDP: the encoder and decoder do not share '{path}.{name}' (was this model saved with "
                            f"untied weights?); it cannot be sharded one unit per layer pair")


def _set_submodule(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _gather_before_backward(modules) -> None:
    """Register FSDP's own pre-backward hook on the outputs of every module of a group, not only on the output of
    the group's last module (see the module docstring)."""
    def hook(module, inputs, output):
        return module._get_fsdp_state()._register_pre_backward_hook(output)

    for module in modules:
        module.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------------- saving
def parameterless_copy(model):
    """A deep copy of `model` whose Parameters are on the meta device (no memory), shared as in `model`."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def unsharded_for_saving(trainer, model):
    """The model to save. Under FSDP: every process must call this (the weights are gathered from all of them),
    and the main process gets a plain copy holding the full trained weights; otherwise `model` itself."""
    skeleton = getattr(trainer, SKELETON, None)
    if skeleton is None:
        return model
    full = _gather_full(model, keep=trainer.args.process_index == 0)
    if full is not None:
        _fill(skeleton, full)
    return skeleton


def _gather_full(model, keep: bool) -> dict[str, torch.Tensor] | None:
    """{name: full CPU tensor} of every distinct Parameter, on the process that keeps them (None elsewhere).
    All processes visit the Parameters in the same order, one collective each."""
    full = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        if keep:
            full[name] = value.detach().cpu()
    return full if keep else None


def _fill(skeleton, full: dict[str, torch.Tensor]) -> None:
    """Give the skeleton's meta Parameters the gathered values, in their original dtype, one new Parameter per
    shared group of names."""
    names_by_param: dict[int, list[str]] = {}
    params = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
        params[id(param)] = param
    for key, names in names_by_param.items():
        source = next((full[n] for n in names if n in full), None)
        if source is None:
            raise RuntimeError(f"FSDP save: no gathered value for {names[0]}")
        meta = params[key]
        value = torch.nn.Parameter(source.to(meta.dtype), requires_grad=meta.requires_grad)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            skeleton.get_submodule(parent)._parameters[leaf] = value
