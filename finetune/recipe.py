"""YAML recipes: pydantic models for every section, `--set` overrides, and one-line errors that name the file,
line, key and fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.tiny import TinySpec
from dgemma_ft.tasks.base import SourceSpec

TEXT_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field("tiny", description="'tiny', a Hub id (owner/name), a local model folder, or a run folder")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    load_in_4bit: bool = False
    backend: Literal["peft", "unsloth"] = "peft"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto (the GPU when one is present), cpu, cuda, cuda:N or mps")
    tiny: TinySpec = Field(default_factory=TinySpec)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name 'tiny', a Hub id or a folder")
        return value


class TaskSection(_Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    train: SourceSpec = Field(default_factory=SourceSpec)
    eval: SourceSpec | None = None
    exclude_eval_from_train: bool = True
    exclude_sources: list[str] = Field(default_factory=list,
                                       description="more evaluation sources whose examples training must not contain")


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(TEXT_LINEAR_NAMES))

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TEXT_LINEAR_NAMES]
        if unknown or not value:
            raise ValueError(f"choose from {', '.join(TEXT_LINEAR_NAMES)} (got {unknown or 'nothing'})")
        return value


class TrainSection(_Section):
    steps: int = Field(800, gt=0)
    lr: float = Field(1.5e-4, gt=0)
    min_lr: float = Field(1.5e-5, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(25, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.95, 0.99)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    eps: float = Field(1e-3, gt=0, lt=1)
    self_conditioning_p: float = Field(0.5, ge=0, le=1)
    self_conditioning_scale: Literal["raw", "temperature"] = Field(
        "raw", description="feed back raw logits, or logits at the sampler's temperature for the block's noise level")
    ar_weight: float = Field(1.0, ge=0)
    block_selection: Literal["random", "all"] = "random"
    canvas_samples: int = Field(1, gt=0, description="corruptions per chosen block, sharing one encoder pass")
    max_blocks: int | None = Field(None, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    output_dir: str = "runs/run"
    gradient_checkpointing: bool = False
    threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: torch's choice)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("both betas must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) cannot exceed lr ({self.lr})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self


class EvalSection(_Section):
    limit: int | None = Field(None, gt=0)
    steps: list[int] = Field(default_factory=lambda: [48])
    batch_size: int | Literal["auto"] = Field(64, description="examples per sampler batch, or 'auto': the largest "
                                                             "that fits (backs off on out-of-memory)")
    pin: bool = True
    renoise: bool = True  # measured: +0.5-0.7 points on Dream 4x4 at 4-48 steps (README)
    max_new_tokens: int | None = Field(None, gt=0)
    seed: int = 0
    after_train: bool = True

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or any(s <= 0 for s in value):
            raise ValueError("list positive denoising step counts, e.g. [1, 4, 16, 48]")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if value != "auto" and value <= 0:
            raise ValueError("give a positive number of examples, or 'auto'")
        return value


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.finetune == "lora" and self.model.name == "tiny":
            raise ValueError("finetune: LoRA on a freshly initialised tiny model has nothing to adapt; use "
                             "'finetune: full', or set model.name to a trained tiny run folder")
        if self.model.load_in_4bit and self.finetune == "full":
            raise ValueError("finetune: full training cannot update 4-bit weights; use 'finetune: lora' "
                             "(QLoRA) or set model.load_in_4bit: false")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------------- loading
def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML (so `1e-3`, `true`, `[1, 4]` work)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write it as key.sub=value, e.g. --set train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set {item!r}: the key is empty")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; any problem raises `UserError` with one line saying where and why."""
    path = Path(path)
    if not path.exists():
        shipped = Path(__file__).resolve().parent.parent / "recipes" / path.name
        if path.parent == Path(".") and shipped.exists():
            path = shipped
        else:
            raise UserError(f"recipe not found: {path} (give the path of a .yaml recipe, e.g. "
                            f"recipes/sudoku-4x4-tiny.yaml)")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem}); check indentation and quoting") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty; it needs at least a 'task:' section with a 'name'")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a recipe is a mapping of sections (model, task, lora, train, eval), "
                        f"not a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, path, text)) from None
    return recipe


def format_validation_error(exc: ValidationError, path: Path, text: str) -> str:
    """The first pydantic error as `file:line: key.path: what is wrong; how to fix it`."""
    error = exc.errors()[0]
    location = [str(p) for p in error["loc"]]
    key = ".".join(location) or "(recipe)"
    line = _line_of(text, location)
    where = f"{path}:{line}" if line else str(path)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(location[:-1])
        known = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(location[-1], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"{where}: {key}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}: {key}: required but missing; add it to the recipe"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{where}: {key}: {message}{shown}"


def _model_at(location: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in location:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _line_of(text: str, location: list[str]) -> int | None:
    """1-based line of the deepest key of `location` present in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in location:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line
