"""LoRA that can be merged: one adapter per shared linear, used by both the encoder and the decoder pass.

DiffusionGemma's encoder and decoder layers are different modules holding the same Parameters. Plain PEFT wraps
each module separately, giving two adapters on one weight, which no merge can fold into a single weight. Here
the decoder's target linears are pointed at the encoder's module objects first, so PEFT wraps each shared linear
once and both passes run through that one wrapper.

On disk the adapter is a standard PEFT folder whose `target_modules` cover both paths and whose decoder tensors
are copies of the encoder's: plain PEFT loads it onto a plain model and computes exactly the same function, and
this kit recognises the identical pairs and shares them again. An adapter whose two paths differ (as Unsloth's
and TRL's DiffusionGemma recipes produce) is "separate": it runs as it is, but cannot be merged into one weight.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.atomic import atomic_dir
from dgemma_ft.finetune.recipe import TEXT_LINEAR_NAMES
from dgemma_ft.plumbing import unwrap_model
from dgemma_ft.user_files import check_safetensors_header, read_json_file

_SUBMODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def target_regex(targets: list[str] | tuple[str, ...] = TEXT_LINEAR_NAMES) -> str:
    """PEFT `target_modules` regex for the text layers' linears on both paths (never the vision tower, whose
    `Gemma4ClippableLinear` plain short names would also match, nor experts, router or self-conditioning)."""
    attn = [t for t in targets if _SUBMODULE[t] == "self_attn"]
    mlp = [t for t in targets if _SUBMODULE[t] == "mlp"]
    parts = []
    if attn:
        parts.append(rf"self_attn\.({'|'.join(attn)})")
    if mlp:
        parts.append(rf"mlp\.({'|'.join(mlp)})")
    return rf".*model\.(encoder\.language_model|decoder)\.layers\.\d+\.({'|'.join(parts)})"


def _pairs(base, targets=TEXT_LINEAR_NAMES):
    """(encoder parent, decoder parent, attribute name) for every target linear present in the model."""
    encoder_layers = base.model.encoder.language_model.layers
    decoder_layers = base.model.decoder.layers
    for enc_layer, dec_layer in zip(encoder_layers, decoder_layers):
        for name in targets:
            enc_parent = getattr(enc_layer, _SUBMODULE[name])
            dec_parent = getattr(dec_layer, _SUBMODULE[name])
            if getattr(enc_parent, name, None) is not None:
                yield enc_parent, dec_parent, name


def share_decoder_linears(model, targets=TEXT_LINEAR_NAMES, force: bool = False) -> int:
    """Point the decoder's target linears at the encoder's module objects (same weights, so the function is
    unchanged); afterwards an adapter wrapped around one is used by both passes. Returns how many were shared.
    `force` skips the check that both hold the same Parameter (bitsandbytes quantizes each copy separately)."""
    base = unwrap_model(model)
    count = 0
    for enc_parent, dec_parent, name in _pairs(base, targets):
        enc_module, dec_module = getattr(enc_parent, name), getattr(dec_parent, name)
        if enc_module is dec_module:
            continue
        if not force and hasattr(dec_module, "weight") and hasattr(enc_module, "weight") and \
                dec_module.weight is not enc_module.weight and not _same_base_weight(enc_module, dec_module):
            raise UserError("the encoder and decoder of this model do not share their text weights; it cannot "
                            "carry one shared adapter (was it saved with untied weights?)")
        setattr(dec_parent, name, enc_module)
        count += 1
    return count


def _same_base_weight(a, b) -> bool:
    weight_a = getattr(getattr(a, "base_layer", a), "weight", None)
    weight_b = getattr(getattr(b, "base_layer", b), "weight", None)
    return weight_a is not None and weight_a is weight_b


def unshare_decoder_linears(model, targets=TEXT_LINEAR_NAMES) -> None:
    """Give the decoder its own module objects again (sharing the same Parameters), as a freshly loaded
    DiffusionGemma has. Used after merging, so the saved checkpoint has the standard layout."""
    base = unwrap_model(model)
    for enc_parent, dec_parent, name in _pairs(base, targets):
        module = getattr(enc_parent, name)
        if getattr(dec_parent, name) is module and isinstance(module, torch.nn.Linear):
            clone = torch.nn.Linear.__new__(torch.nn.Linear)
            torch.nn.Module.__init__(clone)
            clone.in_features, clone.out_features = module.in_features, module.out_features
            clone.weight = module.weight  # the same Parameter, as HF ties them
            clone.bias = module.bias
            setattr(dec_parent, name, clone)


def attach_lora(model, r: int, alpha: float, dropout: float, targets=TEXT_LINEAR_NAMES):
    """Wrap `model` in a PEFT model with one shared LoRA adapter per target linear; all else frozen."""
    from peft import LoraConfig, get_peft_model  # keeps check fast (peft: ~2 s); also after unsloth

    share_decoder_linears(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_regex(targets))
    peft_model = get_peft_model(model, config)
    _retie_wrappers(peft_model, targets)
    return peft_model


def _retie_wrappers(peft_model, targets=TEXT_LINEAR_NAMES) -> None:
    """PEFT visits each shared module once (under its encoder name) and replaces it there only; point the decoder
    at the same wrapper so both passes use one adapter."""
    base = unwrap_model(peft_model)
    for enc_parent, dec_parent, name in _pairs(base, targets):
        wrapper = getattr(enc_parent, name)
        current = getattr(dec_parent, name)
        if current is not wrapper and getattr(wrapper, "base_layer", None) is current:
            setattr(dec_parent, name, wrapper)


# ------------------------------------------------------------------------------------------- adapter folders
ADAPTER_KEYS = ("peft_type", "r", "target_modules")


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    file = path / "adapter_model.safetensors"
    if file.exists():
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as exc:  # a truncated or overwritten file
            raise UserError(f"{file} is corrupt ({str(exc).splitlines()[0]}); re-train the adapter or restore the "
                            f"file") from None
    file = path / "adapter_model.bin"
    if file.exists():
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:  # a damaged pickle
            raise UserError(f"{file} is corrupt ({type(exc).__name__}); re-train the adapter or restore the "
                            f"file") from None
    raise UserError(f"{path}: no adapter_model.safetensors in this folder; point --adapter at a PEFT adapter "
                    f"folder (a run's adapter/ folder)")


def adapter_layout(path: str | Path) -> str:
    """'shared' when every decoder LoRA tensor equals its encoder twin (or the adapter targets only one path),
    'separate' when the two paths carry different adapters."""
    tensors = read_adapter_tensors(path)
    decoder_keys = [k for k in tensors if ".model.decoder.layers." in k]
    if not decoder_keys:
        return "shared"
    for key in decoder_keys:
        twin = key.replace(".model.decoder.layers.", ".model.encoder.language_model.layers.")
        if twin not in tensors or not torch.equal(tensors[key], tensors[twin]):
            return "separate"
    return "shared"


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json as a dict; a damaged one is reported as damaged (PEFT's own error would read like an
    adapter trained on another base)."""
    file = Path(path) / "adapter_config.json"
    if not file.exists():
        raise UserError(f"{path}: no adapter_config.json; point --adapter at a PEFT adapter folder")
    config = read_json_file(file, "the adapter record is damaged: re-train the adapter or restore the file")
    missing = [key for key in ADAPTER_KEYS if key not in config] if isinstance(config, dict) else list(ADAPTER_KEYS)
    if missing:
        raise UserError(f"{file} is corrupt (no {', '.join(missing)}); re-train the adapter or restore the file")
    return config


def adapter_base_name(path: str | Path) -> str | None:
    return read_adapter_config(path).get("base_model_name_or_path")


def check_adapter_folder(path: str | Path, run: str | Path | None = None) -> None:
    """The adapter folder has a readable config and weights. For a run's own adapter (`run`), a missing one
    means the run has no trained adapter, which is what the error says."""
    path = Path(path)
    if run is not None:
        weights = [path / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
        if not path.is_dir() or not any(file.is_file() for file in weights):
            what = "is missing" if not path.is_dir() else "has no adapter_model.safetensors"
            raise UserError(f"{path} {what}; the run has no trained adapter (re-train, or point --adapter at one)")
    read_adapter_config(path)
    if (path / "adapter_model.safetensors").is_file():
        check_safetensors_header(path / "adapter_model.safetensors", "")


def load_adapter(model, path: str | Path, trainable: bool = False):
    """Load a PEFT adapter folder onto `model`: shared adapters are shared again (mergeable), separate ones are
    loaded as plain PEFT does (two adapters per weight)."""
    from peft import PeftModel  # keeps check fast (as in attach_lora)

    read_adapter_config(path)
    layout = adapter_layout(path)
    check_adapter_base(model, path)
    if layout == "shared":
        share_decoder_linears(model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: this adapter does not fit the base model ({str(exc).splitlines()[0]}); was it "
                        f"trained on another base? Check model.name / the run's recipe") from None
    if layout == "shared":
        _retie_wrappers(peft_model)
    peft_model.adapter_layout = layout
    return peft_model


BASE_RECORD = "dgemma_ft_base.json"


def base_fingerprint(model) -> str:
    """A short hash of the base's input embeddings, rounded to bfloat16 so that the same base loaded in float32 or
    bfloat16 matches: two bases with equal shapes but different weights differ."""
    base = unwrap_model(model)
    weight = base.model.decoder.embed_tokens.weight
    sample = weight.detach()[: min(64, weight.shape[0])].to(torch.bfloat16).float().cpu().contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def check_adapter_base(model, path: str | Path, fix: str = "load the base it was trained on (see the run's "
                                                            "recipe.yaml)") -> None:
    """Refuse an adapter recorded as trained on a different base (same shapes would load silently)."""
    record = Path(path) / BASE_RECORD
    if not record.exists():
        return
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{record} is corrupt (not valid JSON); restore it, or delete it to skip the check that "
                        f"the adapter fits this base") from None
    saved = saved if isinstance(saved, dict) else {}
    current = base_fingerprint(model)
    if saved.get("fingerprint") and saved["fingerprint"] != current:
        raise UserError(f"{path}: this adapter was trained on base '{saved.get('base')}' (fingerprint "
                        f"{saved['fingerprint']}), but the loaded base has fingerprint {current}; {fix}")


def save_adapter(peft_model, path: str | Path, base_name: str | None = None) -> None:
    """Save a PEFT adapter folder in the standard two-path form (see module docstring), atomically, with a
    record of its base."""
    fingerprint = base_fingerprint(peft_model)  # embeddings carry no adapter, so this is the base's
    with atomic_dir(path) as staging:
        peft_model.save_pretrained(str(staging))
        (staging / BASE_RECORD).write_text(json.dumps({"base": base_name, "fingerprint": fingerprint}, indent=2))
        file = staging / "adapter_model.safetensors"
        tensors = read_adapter_tensors(staging)
        if getattr(peft_model, "adapter_layout", "shared") == "shared":
            for key in list(tensors):
                if ".model.encoder.language_model.layers." in key:
                    twin = key.replace(".model.encoder.language_model.layers.", ".model.decoder.layers.")
                    tensors.setdefault(twin, tensors[key].clone())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def merge_shared(peft_model):
    """Fold a shared adapter into the base weights and return the plain model, with the standard layout."""
    if getattr(peft_model, "adapter_layout", "shared") != "shared":
        raise UserError("this adapter has separate encoder and decoder weights, which cannot be folded into the "
                        "shared base weights; use `merge --untie` to save a model whose encoder and decoder are "
                        "separate, or evaluate the adapter unmerged")
    model = peft_model.merge_and_unload()
    base = unwrap_model(model)
    for enc_parent, dec_parent, name in _pairs(base):
        setattr(dec_parent, name, getattr(enc_parent, name))
    unshare_decoder_linears(model)
    return model
