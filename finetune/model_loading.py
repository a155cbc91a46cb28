"""Load the model and tokenizer a recipe names: the built-in `tiny`, a Hub id, a local folder, or a run folder
(a finished training run, whose weights or adapter sit on top of the base its recipe names)."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from dgemma_ft.errors import UserError
from dgemma_ft.finetune import quantize_experts as experts_nf4  # used as a module: tests patch its functions
from dgemma_ft.finetune.lora import check_adapter_folder, load_adapter, merge_shared, share_decoder_linears
from dgemma_ft.finetune.recipe import ModelSection, load_recipe
from dgemma_ft.finetune.tiny import build_tiny_model
from dgemma_ft.user_files import check_safetensors_header, read_json_file

# Modules that stay in full precision under 4-bit loading: the vision tower, the router, self-conditioning and
# the head are small or numerically delicate. (The 3-D expert tensors are not linears: `quantize_experts` stores
# them in NF4 after loading.)
# Plain names for older transformers (substring match), `.*name` for 5.2x (matched from the start of the path).
_KEEP = ["vision_tower", "embed_vision", "router", "self_conditioning"]
KEEP_FULL_PRECISION = [*_KEEP, *(f".*{name}" for name in _KEEP), "lm_head"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was loaded, for the run record and model cards
    base_name: str  # the base checkpoint at the root of any run-folder chain


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "recipe.yaml").is_file() and ((path / "model").is_dir() or (path / "adapter").is_dir())


def _is_trained_run_without_result(path: Path) -> bool:
    """A training run folder whose adapter/ or model/ is gone (deleted, or the run never finished)."""
    traces = ("checkpoints", "logs", "trainer_state.json", "train_summary.json")
    return ((path / "recipe.yaml").is_file() and not (path / "config.json").exists() and not is_run_folder(path)
            and any((path / trace).exists() for trace in traces))


def _could_be_hub_id(name: str) -> bool:
    """`owner/name` that the Hub would accept; anything path-like (./x, /x, ~/x, a\\b, a/b/c, x/) is not."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith(("/", "\\")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_kind(name: str) -> str:
    """What `model.name` names: 'tiny', 'run' (a run folder), 'folder' (a saved model) or 'hub' (an id, not looked
    up). A path that does not exist, or a run folder without its result, is a one-line error."""
    if name == "tiny":
        return "tiny"
    path = Path(name).expanduser()
    if is_run_folder(path):
        return "run"
    if _is_trained_run_without_result(path):
        raise UserError(missing_run_result(path))
    if path.is_dir():
        return "folder"
    if path.exists():
        raise UserError(f"model.name '{name}' is a file; point it at the folder that holds config.json and the "
                        f"weights, a run folder, a Hub id (owner/name), or 'tiny'")
    if _could_be_hub_id(name):
        return "hub"
    raise UserError(f"model.name '{name}': no such folder (it is neither 'tiny', an existing folder, nor a Hub id "
                    f"owner/name); check the path")


def missing_run_result(run: str | Path) -> str:
    """The message for a run folder without adapter/ or model/: what is missing and what to do."""
    run = Path(run)
    lora = _run_finetune(run) != "full"
    part = run / ("adapter" if lora else "model")
    if lora:
        return f"{part} is missing; the run has no trained adapter (re-train, or point --adapter at one)"
    return f"{part} is missing; the run has no trained weights (re-train it, or resume it with --resume)"


def _run_finetune(run: Path) -> str | None:
    """The run's `finetune` (lora/full) read leniently, for messages only; None if unreadable."""
    try:
        data = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("finetune") if isinstance(data, dict) else None


def require_finished_run(path: str | Path) -> None:
    """Raise the one-line error for a run folder whose adapter/ or model/ is missing (commands that take a run
    folder call this before saying the folder is not a run)."""
    if _is_trained_run_without_result(Path(path).expanduser()):
        raise UserError(missing_run_result(Path(path).expanduser()))


def read_run_recipe(run: str | Path, overrides: list[str] | None = None):
    """A run folder's recipe.yaml; a damaged one is named as the run's file, with what is wrong."""
    file = Path(run) / "recipe.yaml"
    try:
        return load_recipe(file, overrides)  # unreadable, binary and non-UTF-8 files are UserErrors there too
    except UserError as exc:
        raise UserError(f"run folder '{run}' has a broken recipe.yaml: {exc}") from None


def run_base_chain(run: str | Path) -> list[tuple[Path, object]]:
    """(run folder, its recipe) from `run` down through every run folder named as a base; a loop is an error."""
    chain: list[tuple[Path, object]] = []
    seen: set[Path] = set()
    current = Path(run).expanduser()
    while True:
        key = current.resolve()
        if key in seen:
            raise UserError(f"run folder '{chain[-1][0]}': its recipe.yaml names '{current}' as model.name, which "
                            f"leads back to itself; set model.name there to the base the run was trained on")
        seen.add(key)
        recipe = read_run_recipe(current)
        chain.append((current, recipe))
        name = recipe.model.name
        if name == "tiny" or not is_run_folder(Path(name).expanduser()):
            return chain
        current = Path(name).expanduser()


def run_base_kind(run: Path, name: str) -> str:
    """`model_kind` of the base a run's recipe.yaml names, with errors saying they come from that file."""
    try:
        return model_kind(name)
    except UserError as exc:
        raise UserError(f"run folder '{run}': recipe.yaml names a base that cannot be used: {exc}") from None


# ------------------------------------------------------------------------------------------- model folders
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def inspect_model_folder(folder: str | Path, label: str | None = None) -> dict:
    """config.json of a saved DiffusionGemma folder, after checking what `from_pretrained` would fail on late or
    obscurely: unreadable or foreign config, no (or unreadable) weights, no tokenizer. `label` starts the error."""
    folder = Path(folder).expanduser()
    label = label or f"model.name '{folder}'"
    config = _read_config(folder, label)
    model_type = config.get("model_type")
    if model_type != "diffusion_gemma":
        kind = f"is a {model_type} model, not" if model_type else "has a config.json without model_type: not a"
        raise UserError(f"{label} {kind} DiffusionGemma; point model.name at a DiffusionGemma checkpoint, "
                        f"a run folder, or 'tiny'")
    _check_weights(folder, label)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{label} has no tokenizer (tokenizer.json); save it beside the weights "
                        f"(tokenizer.save_pretrained) or copy it from the base model")
    return config


def _read_config(folder: Path, label: str) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{label}: folder '{folder}' has no config.json; point it at a saved model folder "
                        f"(save_pretrained output), a run folder, a Hub id, or 'tiny'")
    config = read_json_file(file, "restore it or re-save the model with save_pretrained", f"{label}: ")
    if not isinstance(config, dict):
        raise UserError(f"{label}: {file} holds a JSON {type(config).__name__}, not a model config; restore it or "
                        f"re-save the model")
    return config


def _check_weights(folder: Path, label: str) -> None:
    """Weights are present, every shard an index names exists, and every safetensors header reads."""
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern)})
    if not files:
        raise UserError(f"{label} has no weights (*.safetensors) in '{folder}'; save the model there with "
                        f"save_pretrained, or copy its weight files")
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{label}: {index} is damaged (no readable weight_map); restore it") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserError(f"{label}: {len(missing)} weight file(s) named in {index.name} are missing "
                            f"({', '.join(missing[:3])}); finish copying or downloading the model")
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors_header(file, label)


def check_backend(section: ModelSection) -> None:
    """`backend: unsloth` needs a CUDA GPU, the package, and a Hub id or saved folder: say so before any work."""
    if section.backend != "unsloth":
        return
    if not torch.cuda.is_available():
        raise UserError("model.backend: unsloth needs a CUDA GPU (NVIDIA), and none is visible here; use "
                        "backend: peft on this machine")
    if importlib.util.find_spec("unsloth") is None:
        raise UserError("model.backend: unsloth is not installed: pip install 'dgemma-ft[unsloth]' (it pins "
                        "transformers<=5.17), or use backend: peft")
    if section.name == "tiny" or is_run_folder(Path(section.name).expanduser()):
        raise UserError("model.backend: unsloth loads Hub ids and saved model folders only; use backend: peft "
                        "for 'tiny' and run folders")


def resolve_device(name: str = "auto") -> torch.device:
    """The device a model goes to: `auto` is the GPU when one is present (CUDA, else Apple's MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}': no CUDA GPU is visible here; use --device cpu (or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA GPU(s) are visible; use "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device '{name}': MPS is not available here; use --device cpu (or auto)")
    return device


def free_memory() -> None:
    """Collect unreachable models (Trainer, accelerate and PEFT hold them in reference cycles) and hand cached GPU
    memory back, so the next model loads into free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(section: ModelSection, merge_adapter: bool = True) -> LoadedModel:
    """The model and tokenizer for `section`, on `section.device`; errors say what to change. A run folder's
    adapter is merged in memory (so a new adapter can go on top) unless `merge_adapter` is False (evaluation runs it
    as it is)."""
    loaded = _load(section, merge_adapter)
    if section.canvas_length is not None:
        # the recipe's block length over the checkpoint's: the objective, the sampler and the RL records read it
        # from the config and save_pretrained writes it (the weights do not depend on it: positions are rotary);
        # a PeftModel hands the attribute to the wrapped model's config
        loaded.model.config.canvas_length = section.canvas_length
    return loaded


def _load(section: ModelSection, merge_adapter: bool) -> LoadedModel:
    kind = preflight(section)
    dtype = resolve_dtype(section.dtype)
    if section.backend == "unsloth":  # Unsloth places the model itself (on the GPU)
        return _load_unsloth(section, dtype)
    device = resolve_device(section.device)
    name = section.name
    if kind == "tiny":
        model, tokenizer = build_tiny_model(section.tiny)
        model.to(device=device, dtype=dtype)
        _set_attention(model, section.attn_implementation)
        return LoadedModel(model, tokenizer, source="tiny", base_name="tiny")
    if kind == "run":
        return _load_run_folder(Path(name).expanduser(), section, dtype, merge_adapter)
    if kind == "folder":
        return _load_pretrained(str(Path(name).expanduser()), section, dtype)
    return _load_pretrained(name, section, dtype)


def preflight(section: ModelSection) -> str:
    """The checks `load_model` starts with, cheap enough to run before any other work (no weights are read):
    the backend fits this machine, the name exists, a folder holds a DiffusionGemma checkpoint, a run folder's
    recipes read without a loop. Returns `model_kind`."""
    check_backend(section)
    kind = model_kind(section.name)
    if kind == "folder":
        inspect_model_folder(section.name, f"model.name '{section.name}'")
    elif kind == "run":
        run_base_chain(section.name)
    return kind


def _set_attention(model, implementation: str) -> None:
    """Training masks are explicit 4-D additive masks, which sdpa and eager read; flash attention cannot."""
    model.config._attn_implementation = implementation
    for sub in (model.config.text_config, getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = implementation


def _quantization_config(section: ModelSection, dtype: torch.dtype):
    if not section.load_in_4bit:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.load_in_4bit needs bitsandbytes: pip install 'dgemma-ft[bnb]' (or set "
                        "model.load_in_4bit: false)")
    from transformers import BitsAndBytesConfig  # after unsloth: the CLI imports this module to load unsloth first

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
                              llm_int8_skip_modules=KEEP_FULL_PRECISION)


def _load_pretrained(name: str, section: ModelSection, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion  # after unsloth (see _quantization_config)

    device = resolve_device(section.device)
    quantization = _quantization_config(section, dtype)
    staged = quantization is not None and _stage_on_cpu(device)
    # device_map puts every weight straight onto the device as it is read (no full copy in CPU memory first);
    # 4-bit loading onto an accelerator reads into CPU memory instead (see `_place_4bit`)
    kwargs = dict(dtype=dtype, attn_implementation=section.attn_implementation, revision=section.revision,
                  device_map={"": "cpu" if staged else str(device)})
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    held: list = []
    try:
        with _held_transformers_logs(held):
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, revision=section.revision)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        if Path(name).exists():
            raise UserError(_local_load_error(name, exc, held)) from None
        if not isinstance(exc, OSError):
            raise
        raise UserError(f"model.name: cannot fetch '{name}' from the Hugging Face Hub (offline, no access, or a "
                        f"wrong id). Download it where the Hub is reachable (`hf download {name} --local-dir "
                        f"DIR`) and set model.name to that local folder") from None
    if quantization is not None:
        _share_after_quantization(model)
        if staged:
            _place_4bit(model, device)
        else:
            experts_nf4.quantize_experts(model)  # the 3-D expert tensors, which bitsandbytes leaves in 16-bit
        keep_4bit_linears_differentiable(model)
    return LoadedModel(model, tokenizer, source=name, base_name=name)


def keep_4bit_linears_differentiable(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit linears (undoing it where it already happened).

    On CPUs with AVX512-BF16, a `Linear4bit` that runs one forward in eval mode without gradients repacks its
    weight for a fast inference kernel (`gemv_4bit`) and keeps it: every later forward, training included, goes
    through that kernel, which has no backward, so the gradient to the layer's input is silently dropped (LoRA
    gradients of earlier layers were off by more than 100% after one evaluation; tests/test_quantized.py).
    Evaluating and then training in one process (RL, or tests) is normal here, so the repacking is disabled.
    Returns how many linears were touched."""
    try:
        import bitsandbytes as bnb  # optional: bitsandbytes
    except ImportError:
        return 0
    try:  # bitsandbytes versions without the repacking have no inverse either
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse  # optional; no public inverse
    except ImportError:
        _convert_weight_packed_for_cpu_inverse = None
    touched = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if _convert_weight_packed_for_cpu_inverse and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
        touched += 1
    return touched


def _local_load_error(name: str, exc: Exception, held: list) -> str:
    """One line for a local folder that `from_pretrained` refused; a shape mismatch names its first tensor (from
    the load report transformers logged, which is dropped, not printed)."""
    for record in held:
        for row in record.getMessage().splitlines():
            if "MISMATCH" in row and "ckpt:" in row:
                key, shapes = row.split("|")[0].strip(), re.findall(r"\[[^\]]*\]", row.split("ckpt:")[1])
                sizes = f"{shapes[0]} in the weights, {shapes[1]} per config.json" if len(shapes) == 2 else "size"
                return (f"model.name '{name}': its weights do not match its config.json ({key}: {sizes}); was "
                        f"config.json edited or copied from another model? Restore it or re-save the model")
    return (f"model.name: cannot load '{name}': {type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}; its "
            f"config.json and weights do not fit together (re-save the model, or restore its files)")


class _held_transformers_logs:
    """Hold transformers' log records while a model loads: a failed load becomes one error line (not a report
    table above it); after a successful one the records are logged as usual."""

    def __init__(self, held: list):
        self.held = held
        self.logger = logging.getLogger("transformers")

    def __enter__(self):
        held = self.held

        class Hold(logging.Handler):
            def emit(self, record):
                held.append(record)

        self.handlers = self.logger.handlers[:]
        self.logger.handlers = [Hold()]
        return self

    def __exit__(self, kind, value, traceback):
        self.logger.handlers = self.handlers
        if kind is None:
            for record in self.held:
                for handler in self.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)
        return False


def _stage_on_cpu(device: torch.device) -> bool:
    """Whether 4-bit loading reads the checkpoint into CPU memory before the device (any device but the CPU)."""
    return device.type != "cpu"


def _place_4bit(model, device: torch.device) -> None:
    """Put a 4-bit model that `from_pretrained` loaded on the CPU onto `device` without its 16-bit experts ever
    being there together.

    `from_pretrained(device_map={"": device})` would materialise all 16-bit expert tensors (22.8 B weights,
    45.7 GB at the released shape) on the device before `quantize_experts` could store them in NF4: no 24 GB card
    could load the model. So 4-bit loading onto an accelerator reads everything on the CPU (bitsandbytes
    quantizes the linears there; safetensors maps the checkpoint, so weights read in their stored dtype are file
    pages rather than copies), then:
    1. `quantize_experts(model, device=device)`: one expert tensor at a time is copied to the device, quantized
       there (bitsandbytes creates its packed data and `QuantState` on the device) and its 16-bit copies dropped,
       so the device holds the NF4 experts plus at most one 16-bit expert tensor (1.0 GB at the released shape);
    2. `model.to(device)` moves the rest: bitsandbytes' `Params4bit.to` moves each linear's `QuantState` with its
       data, full-precision parts move as usual, the NF4 experts (already there) stay.
    A single-device map means transformers dispatches no accelerate hooks (it does for mixed cpu/GPU maps, which
    would replace the CPU weights by meta tensors behind offload hooks), and the decoder keeps pointing at the
    encoder's modules. Peak device memory: the final footprint (~13.5 GiB) plus one 16-bit expert tensor."""
    experts_nf4.quantize_experts(model, device=device)
    model.to(device)
    experts_nf4.check_device(model, device)
    free_memory()


def _share_after_quantization(model) -> None:
    """bitsandbytes replaces encoder and decoder linears separately; point the decoder at the encoder's
    quantized modules so the shared weights stay shared (and one adapter serves both)."""
    share_decoder_linears(model, force=True)


def _load_run_folder(path: Path, section: ModelSection, dtype: torch.dtype, merge: bool = True) -> LoadedModel:
    """A finished run: full weights in model/, or its base (from its recipe) plus the adapter in adapter/,
    merged in memory so a new adapter can go on top."""
    run_recipe = read_run_recipe(path)
    if (path / "model").is_dir():
        inspect_model_folder(path / "model", f"run folder '{path}': model/")
        inner = section.model_copy(update={"name": str(path / "model")})
        loaded = _load_pretrained(str(path / "model"), inner, dtype)
        loaded.source = str(path)
        loaded.base_name = run_recipe.model.name if run_recipe.model.name != "tiny" else str(path)
        return loaded
    check_adapter_folder(path / "adapter", run=path)
    run_base_kind(path, run_recipe.model.name)
    base = load_model(run_recipe.model.model_copy(update={"dtype": section.dtype, "device": section.device}))
    adapted = load_adapter(base.model, path / "adapter")
    model = merge_shared(adapted) if merge else adapted
    return LoadedModel(model, base.tokenizer, source=str(path), base_name=base.base_name)


def _load_unsloth(section: ModelSection, dtype: torch.dtype) -> LoadedModel:
    """Unsloth's loader (fast kernels, its 4-bit path) when it is installed and a GPU is present. Unsloth patches
    transformers when it is imported, so `dgemma-ft` imports it first (`import_backend_first`); the kit then points
    the decoder at the encoder's (separately quantized) linears so one shared adapter serves both passes."""
    check_backend(section)
    if "unsloth" not in sys.modules and "transformers" in sys.modules:
        warnings.warn("unsloth is imported after transformers, so its patches may not apply: import unsloth first "
                      "(the dgemma-ft command does this for recipes with model.backend: unsloth)", stacklevel=2)
    unsloth = importlib.import_module("unsloth")  # optional dependency, imported only for this backend
    # its DiffusionGemma loader where this Unsloth has one (2026.10.4+), else the generic one
    loader = getattr(unsloth, "FastDiffusionModel", None) or unsloth.FastModel
    try:
        model, tokenizer = loader.from_pretrained(model_name=section.name, dtype=dtype,
                                                  load_in_4bit=section.load_in_4bit, full_finetuning=False)
    except OSError as exc:
        raise UserError(f"model.name: unsloth cannot load '{section.name}': {str(exc).splitlines()[0]}; "
                        f"download it and point model.name at the local folder") from None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    _share_after_quantization(model)  # Unsloth's 4-bit path quantizes encoder and decoder linears separately
    return LoadedModel(model, tokenizer, source=section.name, base_name=section.name)


def backend_in(recipe_path: str | Path, overrides: list[str]) -> str | None:
    """The `model.backend` a recipe file (plus `--set` overrides) names, read without importing transformers;
    None when the file cannot be read (the command itself will then say what is wrong)."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.backend":
            return value.strip()
    try:
        data = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("backend") if isinstance(model, dict) else None


def import_backend_first(recipe_path: str | Path, overrides: list[str]) -> bool:
    """Import unsloth before transformers when the recipe chooses `backend: unsloth` (its patches must be in place
    before transformers' modules load). Returns whether it was imported."""
    if backend_in(recipe_path, overrides) != "unsloth" or importlib.util.find_spec("unsloth") is None:
        return False
    importlib.import_module("unsloth")
    return True
