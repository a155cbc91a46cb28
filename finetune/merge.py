"""`dgemma-ft merge RUN --out DIR`: fold a run's LoRA adapter into its base and save a standard checkpoint.

A shared adapter (what this kit trains, see lora.py) folds into the shared encoder/decoder weights, so the merged
checkpoint has the base's layout and size and loads with plain `DiffusionGemmaForBlockDiffusion.from_pretrained`.

A separate adapter (encoder and decoder carry different LoRA weights, as plain PEFT, Unsloth and TRL produce)
cannot fold into one shared weight. With `untie=True` every tied weight is given its own copy first, each path
takes only its own delta, and the config says `tie_word_embeddings: false`, which for DiffusionGemma turns off
every tie (encoder/decoder and embeddings/lm_head), so `from_pretrained` keeps them apart. That checkpoint holds
the text weights twice.

A full fine-tune run (RUN/model) has nothing to fold: it is saved again in the chosen dtype.

The output folder also gets the run's recipe.yaml (so `dgemma-ft eval DIR` works) and `dgemma_ft_merge.json`.

An adapter trained on the 4-bit base (QLoRA: NF4 linears and experts) is merged the usual QLoRA way: the base is
reloaded in the output precision, never in 4-bit, and the adapter folds into those weights. The base-fingerprint
check works across precisions (it hashes the embeddings, which 4-bit loading keeps in full precision, rounded to
bfloat16). The merged folder's recipe.yaml says `load_in_4bit: false`, so `eval DIR` runs the merged weights as
saved; the merge record notes `trained_in_4bit`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
from transformers.utils import logging as hf_logging

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.atomic import atomic_dir
from dgemma_ft.finetune.lora import (BASE_RECORD, adapter_base_name, adapter_layout, check_adapter_base, load_adapter,
                                     merge_shared, read_adapter_tensors)
from dgemma_ft.finetune.model_loading import is_run_folder, load_model, resolve_device
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.output_paths import require_writable_dir

MERGE_RECORD = "dgemma_ft_merge.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class MergeResult:
    out: Path
    source: str
    layout: str  # 'shared' | 'separate' | 'full'
    dtype: str
    base: str | None
    untied: bool
    trained_in_4bit: bool = False  # the run trained on the 4-bit base (QLoRA); the merge is full precision
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes

    def record(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data.pop("files")
        return data


# ------------------------------------------------------------------------------------------------- resolving
def resolve_run_folder(source: str | Path) -> Path:
    """The run folder for `source` (a run folder, or its adapter/ or model/ subfolder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"merge: '{source}' does not exist; give the run folder that `dgemma-ft train` wrote "
                        f"(it holds recipe.yaml and adapter/ or model/)")
    if path.name in ("adapter", "model") and is_run_folder(path.parent):
        path = path.parent
    if not is_run_folder(path):
        if (path / "adapter_config.json").exists():
            raise UserError(f"merge: '{source}' is a bare adapter folder; merge needs the run folder around it "
                            f"(recipe.yaml names the base). Put it in RUN/adapter next to a recipe.yaml whose "
                            f"model.name is its base, then run `dgemma-ft merge RUN --out DIR`")
        raise UserError(f"merge: '{source}' is not a run folder (recipe.yaml + adapter/ or model/); give the "
                        f"folder that `dgemma-ft train` wrote")
    return path


def check_output(out: Path, run: Path, force: bool) -> None:
    """Refuse, before anything loads, an --out that --force would let replace the run (or a part of it, or a folder
    holding it), or that cannot be written. Symlinks and '..' are resolved first."""
    out_r, run_r = out.resolve(), run.resolve()
    if out_r == run_r or out_r in run_r.parents or run_r in out_r.parents:
        where = "it is" if out_r == run_r else "it contains" if out_r in run_r.parents else "it is inside"
        raise UserError(f"--out {out}: this would overwrite the run folder '{run}' ({where} the run folder, "
                        f"with its adapter, weights and checkpoints); choose a folder outside it, e.g. "
                        f"--out {run}-merged")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file with this name exists; choose another --out")
    if out.exists() and not force:
        raise UserError(f"--out {out}: the folder already exists; pass --force to replace it, or choose another "
                        f"--out")
    require_writable_dir(out, "--out")
    if out.exists():  # replacing it renames it away: its parent must be writable too
        require_writable_dir(out.parent, "--out")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).expanduser().exists()


def recorded_base(adapter_dir: Path) -> str | None:
    """The base an adapter says it was trained on: dgemma_ft_base.json, else PEFT's base_model_name_or_path."""
    record = adapter_dir / BASE_RECORD
    if record.exists():
        name = json.loads(record.read_text()).get("base")
        if name:
            return name
    return adapter_base_name(adapter_dir)


def check_base_name(adapter_dir: Path, loaded_base: str) -> None:
    """Two different Hub ids are two different bases. (Local paths cannot be compared by name: a local copy of a
    Hub model is the same base; the fingerprint and shape checks cover them.)"""
    saved = recorded_base(adapter_dir)
    if _is_hub_id(saved) and _is_hub_id(loaded_base) and saved != loaded_base:
        raise UserError(f"{adapter_dir}: this adapter was trained on '{saved}', but the run's recipe loads "
                        f"'{loaded_base}'; set model.name in the run's recipe.yaml to the base it was trained on")


def check_adapter_shapes(model, adapter_dir: Path) -> None:
    """Every LoRA tensor must name a linear of `model` with matching in/out features."""
    tensors = read_adapter_tensors(adapter_dir)
    pattern = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            continue
        module_name, which = match.groups()
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise UserError(f"{adapter_dir}: the adapter has weights for '{module_name}', which this base does "
                            f"not have; was it trained on another model? Check model.name in the run's "
                            f"recipe.yaml") from None
        module = getattr(module, "base_layer", module)
        in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_features is None:
            continue
        ok = tensor.shape[1] == in_features if which == "A" else tensor.shape[0] == out_features
        if not ok:
            raise UserError(f"{adapter_dir}: lora_{which} of '{module_name}' has shape {tuple(tensor.shape)}, but "
                            f"the base's linear is {in_features} -> {out_features}; the adapter was trained on a "
                            f"different base. Set model.name in the run's recipe.yaml to that base")


# ---------------------------------------------------------------------------------------------------- untying
def untie_weights(model) -> int:
    """Give every tied weight (encoder/decoder text weights, embeddings/lm_head) its own tensor and set the config
    so `from_pretrained` does not tie them again. Returns how many copies were made."""
    seen_modules: set[int] = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name:
            continue
        if id(module) in seen_modules:  # one module object reachable under two names: copy it
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, copy.deepcopy(module))
        seen_modules.add(id(module))
    seen: set[int] = set()
    copies = 0
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in seen or param.data_ptr() in seen:
                module._parameters[pname] = torch.nn.Parameter(param.detach().clone(),
                                                               requires_grad=param.requires_grad)
                copies += 1
            else:
                seen.add(id(param))
                seen.add(param.data_ptr())
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return copies


# ------------------------------------------------------------------------------------------------------ merge
def merge(run_dir_or_adapter_source: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False,
          untie: bool = False, say: Callable[[str], None] | None = None, device: str | None = None) -> MergeResult:
    """Fold the run's adapter into its base (or re-save a full run) as a standard checkpoint in `out`, working on
    `device` (default: the GPU when one is present)."""
    say = say or (lambda message: None)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    run = resolve_run_folder(run_dir_or_adapter_source)
    out = Path(out).expanduser()
    check_output(out, run, force)
    recipe = load_recipe(run / "recipe.yaml")
    if (run / "model").is_dir():
        model, tokenizer, layout, base = _load_full(run, dtype, device)
        untied = not getattr(model.config, "tie_word_embeddings", True)
    else:
        model, tokenizer, layout, base, untied = _load_and_merge(run, recipe, dtype, untie, say, device)
    model.to(DTYPES[dtype])
    model.eval()

    result = MergeResult(out=out, source=str(run.resolve()), layout=layout, dtype=dtype, base=base, untied=untied,
                         trained_in_4bit=bool(recipe.model.load_in_4bit))
    with _quiet_transformers(), atomic_dir(out) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _write_merged_recipe(run / "recipe.yaml", staging / "recipe.yaml")
        record = {**result.record(), "out": str(out), "tool": "dgemma-ft merge"}
        (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2))
        if untied:
            _check_untied_files(staging)
        result.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
    return result


def _write_merged_recipe(source: Path, target: Path) -> None:
    """The run's recipe.yaml, for `dgemma-ft eval DIR`. A QLoRA run's recipe says `load_in_4bit: true`, which
    would re-quantize the merged checkpoint when it is evaluated; the merged folder holds full-precision weights,
    so its recipe says `load_in_4bit: false` (the merge record keeps `trained_in_4bit`)."""
    text = source.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("load_in_4bit"):
        model["load_in_4bit"] = False
        text = yaml.safe_dump(data, sort_keys=False)
    target.write_text(text, encoding="utf-8")


def _load_full(run: Path, dtype: str, device: str | None = None):
    folder = run / "model"
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(folder), dtype=DTYPES[dtype], device_map={"": str(resolve_device(device or "auto"))})
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except OSError as exc:
        raise UserError(f"{folder}: cannot load the run's weights ({str(exc).splitlines()[0]}); is the run "
                        f"finished? (`dgemma-ft train --resume` completes it)") from None
    base = load_recipe(run / "recipe.yaml").model.name
    return model, tokenizer, "full", base


def _load_and_merge(run: Path, recipe, dtype: str, untie: bool, say, device: str | None = None):
    adapter_dir = run / "adapter"
    layout = adapter_layout(adapter_dir)
    if layout == "separate" and not untie:
        raise UserError(f"{adapter_dir}: the encoder and decoder carry different adapters (a 'separate' adapter, "
                        f"as plain PEFT, Unsloth or TRL train), which cannot fold into the shared base weights; "
                        f"pass --untie to save a model whose encoder and decoder weights are separate copies "
                        f"(text weights stored twice), or evaluate the adapter unmerged")
    # Merge in the output precision (never 4-bit, always the plain PEFT backend).
    section = recipe.model.model_copy(update={"dtype": dtype, "load_in_4bit": False, "backend": "peft",
                                              "device": device or recipe.model.device})
    loaded = load_model(section)
    check_base_name(adapter_dir, loaded.base_name)
    check_adapter_base(loaded.model, adapter_dir, fix=f"set model.name in {run / 'recipe.yaml'} to the base the "
                                                      f"adapter was trained on")
    model = loaded.model
    check_adapter_shapes(model, adapter_dir)
    untied = False
    if layout == "shared":
        if untie:
            say("note: the adapter is shared (one adapter for both paths); --untie is not needed and is ignored")
        model = merge_shared(load_adapter(model, adapter_dir))
    else:
        from peft import PeftModel  # keeps check fast (peft: ~2 s), as in lora.py

        untie_weights(model)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"{adapter_dir}: this adapter does not fit the base ({str(exc).splitlines()[0]}); "
                            f"set model.name in the run's recipe.yaml to the base it was trained on") from None
        model = peft_model.merge_and_unload()
        untied = True
    tokenizer = loaded.tokenizer
    if (adapter_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    return model, tokenizer, layout, recorded_base(adapter_dir) or loaded.base_name, untied


def _check_untied_files(folder: Path) -> None:
    """An untied checkpoint must hold the encoder's own text weights and say tie_word_embeddings: false."""
    config = json.loads((folder / "config.json").read_text())
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    if config.get("tie_word_embeddings", True) or not any(".encoder.language_model.layers." in k for k in keys):
        raise RuntimeError("internal error: the untied checkpoint lost its encoder weights; please report this")


class _quiet_transformers:
    """Silence transformers' info/warning chatter while saving (the CLI prints one summary line)."""

    def __enter__(self):
        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        hf_logging.set_verbosity(self._level)
        return False
