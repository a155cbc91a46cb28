"""YAML recipes: pydantic models for every section, `--set` overrides, and one-line errors that name the file,
line, key and fix."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.rl.config import RLConfig
from dgemma_ft.finetune.tiny import TinySpec
from dgemma_ft.strict_models import (NumbersNotBooleans, check_numbers, clean_message, describe_input,
                                     first_pydantic_error)
from dgemma_ft.tasks import SourceSpec, TaskOptions, task_class

TEXT_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RECIPE_BYTES = 2**20  # a recipe is a few KB of YAML; a larger file is not one (and is not read whole)
SEED_MAX = 2**32 - 1  # numpy's seed range: the trainer seeds numpy with train.seed
# The built-in tiny model is for laptops and tests: sizes past these (and past TINY_MAX_PARAMETERS in all) would
# take minutes to build or exhaust memory; a larger model belongs in a real checkpoint.
TINY_LIMITS = {"hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 64, "num_attention_heads": 64,
               "num_key_value_heads": 64, "head_dim": 512, "global_head_dim": 512, "num_experts": 256,
               "top_k_experts": 256, "moe_intermediate_size": 16384, "sliding_window": 131072,
               "sliding_pattern": 64, "canvas_length": 8192, "max_position_embeddings": 131072, "seed": SEED_MAX}
TINY_MAX_PARAMETERS = 500_000_000  # 2 GB of float32 weights


class _Section(NumbersNotBooleans):
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
    canvas_length: int | None = Field(None, gt=0, le=TINY_LIMITS["canvas_length"],
                                      description="the decoder's canvas (block) length for training, sampling and "
                                                  "saving; default: the checkpoint's (256 in the release)")
    tiny: TinySpec = Field(default_factory=TinySpec)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name 'tiny', a Hub id or a folder")
        return value

    @field_validator("tiny", mode="before")
    @classmethod
    def _tiny_numbers(cls, value: Any) -> Any:
        check_numbers(TinySpec, value)  # TinySpec is a plain model: give it the recipe's no-booleans rule
        return value

    @field_validator("tiny")
    @classmethod
    def _tiny_sizes(cls, value: TinySpec) -> TinySpec:
        for name, limit in TINY_LIMITS.items():
            size = getattr(value, name, None)
            if isinstance(size, int) and size > limit:
                raise PydanticCustomError("tiny_too_large", "at most {limit} for the built-in tiny model (got "
                                          "{size}); for a larger model use a real checkpoint",
                                          {"limit": f"{limit:,}", "size": size, "field": name})
        parameters = tiny_parameters(value)
        if parameters > TINY_MAX_PARAMETERS:
            raise PydanticCustomError("tiny_too_large", "these sizes make about {count} parameters; the built-in "
                                      "tiny model takes at most {limit}: lower the sizes, or use a real checkpoint",
                                      {"count": f"{parameters:,}", "limit": f"{TINY_MAX_PARAMETERS:,}"})
        return value


def tiny_parameters(spec: TinySpec) -> int:
    """About how many parameters the tiny model has (attention, dense MLP and experts per layer; embeddings)."""
    head = max(spec.head_dim, spec.global_head_dim)
    attention = 2 * spec.hidden_size * head * (spec.num_attention_heads + spec.num_key_value_heads)
    mlp = 3 * spec.hidden_size * (spec.intermediate_size + spec.num_experts * spec.moe_intermediate_size)
    return spec.num_hidden_layers * (attention + mlp) + 2 * 128 * spec.hidden_size


class TaskSource(SourceSpec):
    """A split's data source (`task.train`, `task.eval`, or an `eval.also` set), with task options of its own over
    task.options: e.g. generated training examples from one half of a vocabulary and evaluation examples from the
    other, or 3-number Countdown evaluation for a task that trains on 3 and 4 numbers. The options change how the
    source's rows are generated and read, and how they are judged."""

    options: dict[str, Any] = Field(default_factory=dict, description="task options for this source, over "
                                                                      "task.options")

    def source_spec(self) -> SourceSpec:
        """The data source alone (source, size, seed, strict, columns), as the task reads it."""
        return SourceSpec(**self.model_dump(include=set(SourceSpec.model_fields)))


class TaskSection(_Section):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    train: TaskSource = Field(default_factory=TaskSource)
    train_also: list[TaskSource] = Field(default_factory=list,
                                         description="more training sources mixed into task.train, each with "
                                                     "its own options (e.g. rehearsal of a skill to keep)")
    eval: TaskSource | None = None
    exclude_eval_from_train: bool = True
    exclude_sources: list[str] = Field(default_factory=list,
                                       description="more evaluation sources whose examples training must not contain")


class LoraSection(_Section):
    r: int = Field(16, gt=0, le=4096, description="adapter rank; at most 4,096 (wider than released models' "
                                                  "layers, so a larger rank adapts nothing more)")
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(TEXT_LINEAR_NAMES))

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"list at least one of {', '.join(TEXT_LINEAR_NAMES)}")
        unknown = [t for t in value if t not in TEXT_LINEAR_NAMES]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a layer LoRA adapts; choose from {', '.join(TEXT_LINEAR_NAMES)}")
        return value


class TrainSection(_Section):
    steps: int = Field(800, gt=0, le=10_000_000, description="optimizer updates; at most 10,000,000 (about 4 "
                                                             "months at one update a second: more is a typo)")
    lr: float = Field(1.5e-4, gt=0)
    min_lr: float = Field(1.5e-5, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(25, ge=0)
    batch_size: int = Field(8, gt=0, le=65536, description="examples per device and update; at most 65,536 (no "
                                                           "accelerator holds more; use grad_accum)")
    grad_accum: int = Field(1, gt=0, le=65536, description="batches accumulated per update; at most 65,536")
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.95, 0.99)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX, description="0 to 4,294,967,295 (numpy's seed range)")
    eps: float = Field(1e-3, gt=0, lt=1)
    self_conditioning_p: float = Field(0.5, ge=0, le=1)
    self_conditioning_scale: Literal["raw", "temperature"] = Field(
        "raw", description="feed back raw logits, or logits at the sampler's temperature for the block's noise level")
    ar_weight: float = Field(1.0, ge=0)
    block_selection: Literal["random", "all"] = "random"
    canvas_samples: int = Field(1, gt=0, le=1024, description="corruptions per chosen block, sharing one encoder "
                                                              "pass; at most 1,024 (each costs a decoder pass)")
    max_blocks: int | None = Field(None, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    output_dir: str = "runs/run"
    gradient_checkpointing: bool = False
    threads: int | None = Field(None, gt=0, le=4096, description="CPU threads for torch (default: torch's "
                                                                 "choice); at most this machine's count")

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: int | None, info: ValidationInfo) -> int | None:
        """More threads than CPUs only slows torch down, and absurd counts fail in thread creation at training
        (MemoryError). Checked for recipes loaded to run here, not for saved run recipes read elsewhere."""
        machine = os.cpu_count() or 1
        if value is not None and value > machine and (info.context or {}).get("this_machine"):
            raise ValueError(f"this machine has {machine} CPU threads; give at most {machine}, or leave threads out")
        return value

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


MAX_DENOISING_STEPS = 10_000  # per block; a block is at most a few thousand tokens, each needs at most one step
MAX_EVAL_BATCH = 65536


EXTRA_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_EXTRA_NAME = 80


class ExtraEval(TaskSource):
    """One of `eval.also`: another data set the recipe's evaluation measures too (e.g. the skill a fine-tune must
    keep), with its own task options. Its source keys are those of `task.eval`; it is written to RUN/evals/NAME."""

    name: str = Field(description="names the set and its report folder RUN/evals/NAME: letters, digits, '.', "
                                  "'_', '-'")
    limit: int | None = Field(None, gt=0, le=10_000_000, description="evaluate the first N examples (default: "
                                                                     "eval.limit); at most 10,000,000")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not EXTRA_NAME.match(value) or value in (".", "..") or len(value) > MAX_EXTRA_NAME:
            raise ValueError(f"use up to {MAX_EXTRA_NAME} letters, digits, '.', '_' and '-' (it names the folder "
                             f"RUN/evals/NAME), e.g. 'four'")
        return value


class EvalSection(_Section):
    limit: int | None = Field(None, gt=0, le=10_000_000, description="evaluate the first N examples; at most "
                                                                     "10,000,000")
    steps: list[int] = Field(default_factory=lambda: [48], description="denoising step counts, each at most 10,000")
    batch_size: int | Literal["auto"] = Field(64, description="examples per sampler batch (at most 65,536), or "
                                                             "'auto': the largest that fits (backs off on "
                                                             "out-of-memory)")
    pin: bool = True
    renoise: bool = True  # measured: +0.5-0.7 points on Dream 4x4 at 4-48 steps (README)
    max_new_tokens: int | None = Field(None, gt=0, le=1_000_000, description="at most 1,000,000 tokens")
    seed: int = Field(0, ge=-SEED_MAX, le=SEED_MAX, description="-4,294,967,295 to 4,294,967,295")
    after_train: bool = True
    base: bool = Field(False, description="the recipe's evaluation also measures the model it started from (LoRA: "
                                          "the adapter off), as `eval --base` does")
    also: list[ExtraEval] = Field(default_factory=list, description="more data sets the recipe's evaluation "
                                                                    "measures, each written to RUN/evals/NAME")

    @field_validator("also")
    @classmethod
    def _unique_names(cls, value: list[ExtraEval]) -> list[ExtraEval]:
        seen: dict[str, int] = {}
        for index, entry in enumerate(value):
            if entry.name in seen:
                raise PydanticCustomError(
                    "duplicate_name", "'{name}' is also the name of eval.also[{first}]; give each extra evaluation "
                    "its own name (it names its report folder)",
                    {"name": entry.name, "first": seen[entry.name], "path": [index, "name"]})
            seen[entry.name] = index
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or any(s <= 0 for s in value):
            raise ValueError("list positive denoising step counts, e.g. [1, 4, 16, 48]")
        if max(value) > MAX_DENOISING_STEPS:
            raise ValueError(f"at most {MAX_DENOISING_STEPS:,} denoising steps per block (a block has at most a "
                             f"few thousand tokens, and one step can fill each)")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 < value <= MAX_EVAL_BATCH:
            raise ValueError(f"give a number of examples from 1 to {MAX_EVAL_BATCH:,}, or 'auto'")
        return value


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    rl: RLConfig | None = Field(None, description="what `dgemma-ft rl` does (reinforcement learning from the "
                                                     "task's validators)")

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
        data = self.model_dump(mode="json", exclude={"rl"} if self.rl is None else None)  # no `rl: null` line
        return yaml.safe_dump(data, sort_keys=False)


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
    path = _recipe_path(Path(path))
    text = _read_text(path)
    data = _parse_yaml(text, path)
    if data is None:
        raise UserError(f"{path}: the recipe is empty; it needs at least a 'task:' section with a 'name'")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a recipe is a mapping of sections (model, task, lora, train, eval), "
                        f"not a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data, context={"this_machine": not _is_saved_copy(path)})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, path, text)) from None
    _check_columns(recipe, path, text)
    return recipe


def _recipe_path(path: Path) -> Path:
    """The recipe file: as given, or a shipped recipe by bare name; a folder or a missing file is an error."""
    if path.is_dir():
        inside = path / "recipe.yaml"
        hint = f" (its recipe is {inside})" if inside.is_file() else ""
        raise UserError(f"{path} is a folder; give a .yaml recipe file{hint}")
    if path.exists():
        return path
    shipped = Path(__file__).resolve().parent.parent / "recipes" / path.name
    if path.parent == Path(".") and shipped.exists():
        return shipped
    raise UserError(f"recipe not found: {path} (give the path of a .yaml recipe, e.g. recipes/sudoku-4x4-tiny.yaml)")


def _read_text(path: Path) -> str:
    """The file as text, refusing what is not a small UTF-8 text file (binary data, UTF-16, a huge file)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB, so not a recipe (a recipe is a few "
                        f"KB of YAML); give a .yaml recipe file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: not a text/YAML file this tool reads (it is UTF-16); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise UserError(f"{path}: not a text/YAML file (it holds binary data); give a .yaml recipe saved as UTF-8")
    return text


class _KeyProblem(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would let through silently: a key given twice (the last one would
    win) and a key that is not text (`1:`, `null:`, `yes:` are a number, nothing and a boolean to YAML)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                shown = getattr(key_node, "value", "") if isinstance(key_node, yaml.ScalarNode) else "?"
                raise _KeyProblem(line, f"key '{shown}' is read as {_yaml_kind(key)}, not a name; keys are names "
                                        f"like 'steps' (quote it if it is meant as text)")
            if key in seen:
                raise _KeyProblem(line, f"'{key}' is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return f"a {type(value).__name__}"


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _KeyProblem as exc:
        raise UserError(f"{path}:{exc.line}: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe; a recipe has a few levels of sections") from None
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise UserError(f"{path}: not a text/YAML file (control character #x{code:02x} at position {exc.position}); "
                        f"give a .yaml recipe saved as UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem}); check indentation and quoting") from None


def _is_saved_copy(path: Path) -> bool:
    """A run or merged folder's recipe.yaml: checked on the machine that trained it, and read elsewhere (for
    eval, merge, push, or as a base), so machine-specific limits (train.threads) do not apply."""
    folder = path.parent
    return path.name == "recipe.yaml" and any((folder / name).exists() for name in (
        "adapter", "model", "checkpoints", "logs", "config.json", "train_summary.json", "trainer_state.json"))


def _check_columns(recipe: Recipe, path: Path, text: str) -> None:
    """A `columns:` key naming no field the task reads would be ignored: refuse it here, with its line. So are
    `eval.also` entries whose options (over task.options) the task refuses."""
    cls = task_class(recipe.task.name)
    if cls is None:  # an unknown task fails when it is built, with the list of known ones
        return
    for where in all_sources(recipe):
        where_in_recipe, spec = _source_entry(recipe, where)
        unknown = cls.unknown_column(spec.columns) if spec is not None else None
        if unknown is not None:
            location = [*where_in_recipe, "columns", unknown[0]]
            raise UserError(f"{_where(path, text, location)}: {dotted(location)}: {unknown[1]}")
    for where in all_sources(recipe):
        problem = source_options_problem(recipe, where)
        if problem is not None:
            location, message = problem
            raise UserError(f"{_where(path, text, location)}: {message}")


# task.train, task.eval, eval.also[index] (an int), or task.train_also[index] (("train_also", index))
SourceName = Union[Literal["train", "eval"], int, tuple[str, int]]


def all_sources(recipe: Recipe) -> list[SourceName]:
    """Every data source the recipe names, as `source_options` takes them."""
    return (["train", "eval"] + [("train_also", index) for index in range(len(recipe.task.train_also))]
            + list(range(len(recipe.eval.also))))


def _source_entry(recipe: Recipe, where: SourceName) -> tuple[list, TaskSource | None]:
    """(its location in the recipe, the source) of task.train, task.eval, eval.also[where] or
    task.train_also[index]."""
    if isinstance(where, str):
        return ["task", where], getattr(recipe.task, where)
    if isinstance(where, tuple):
        return ["task", *where], recipe.task.train_also[where[1]]
    return ["eval", "also", where], recipe.eval.also[where]


def source_options(recipe: Recipe, where: SourceName) -> TaskOptions | dict[str, Any]:
    """The task options of a source (task.train, task.eval or eval.also[index]): its `options` over task.options,
    validated by the task (a dict when the task is unknown, which fails by name when it is built). Raises
    `UserError` naming the source's key."""
    problem = source_options_problem(recipe, where)
    if problem is not None:
        raise UserError(problem[1])
    entry = _source_entry(recipe, where)[1]
    merged = {**recipe.task.options, **(entry.options if entry is not None else {})}
    cls = task_class(recipe.task.name)
    return merged if cls is None else cls.Options.model_validate(merged)


def source_options_problem(recipe: Recipe, where: SourceName) -> tuple[list, str] | None:
    """(location in the recipe, one-line message) when the task refuses a source's options merged over
    task.options; None when they are valid, or when task.options alone are refused (that error names
    task.options when the task is built)."""
    cls = task_class(recipe.task.name)
    location, entry = _source_entry(recipe, where)
    if cls is None or entry is None or not entry.options:
        return None
    try:
        cls.Options.model_validate({**recipe.task.options, **entry.options})
        return None
    except ValidationError as exc:
        try:
            cls.Options.model_validate(recipe.task.options)
        except ValidationError:
            return None
        prefix = dotted([*location, "options"])
        message = first_pydantic_error(exc, prefix, cls.Options)
        error = exc.errors()[0]
        key = str(((error.get("ctx") or {}).get("field")) or (error["loc"][0] if error["loc"] else ""))
        if key and key not in entry.options and key in recipe.task.options:
            message += f" (task.options sets {key}; override it in {prefix})"
        return [*location, "options", *([key] if key else [])], message


def _where(path: Path | str, text: str, location: list) -> str:
    """`file:line` of the deepest key of `location` present in the recipe text, else the file."""
    line = _line_of(text, location)
    return f"{path}:{line}" if line else str(path)


def dotted(location: list) -> str:
    """A recipe key path as a person writes it: `eval.also[0].name` (list positions in brackets)."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def format_validation_error(exc: ValidationError, path: Path, text: str) -> str:
    """The first pydantic error as `file:line: key.path: what is wrong; how to fix it`."""
    error = exc.errors()[0]
    location = list(error["loc"])
    context = error.get("ctx") or {}
    if context.get("field"):  # a nested check that names the key inside the value it was given
        location.append(str(context["field"]))
    if isinstance(context.get("path"), list):  # a check on a list that names the item (and key) at fault
        location += context["path"]
    key = dotted(location) or "(recipe)"
    where = _where(path, text, location)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(location[:-1])
        known = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(location[-1]), known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"{where}: {key}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}: {key}: required but missing; add it to the recipe"
    message = clean_message(error["msg"])
    if kind == "less_than_equal":
        message = _too_large(location, context.get("le"), message)
    given = error.get("input")
    if isinstance(given, list) and any(isinstance(item, dict) for item in given):
        given = None  # a list of sections (eval.also) says nothing shown whole
    return f"{where}: {key}: {message}{describe_input(given, message)}"


def _too_large(location: list, limit: Any, message: str) -> str:
    """`at most N (why)`, the why from the field's description, for the bounds that keep runs sane."""
    parent = _model_at(location[:-1])
    field = parent.model_fields.get(location[-1]) if parent else None
    description = field.description if field else None
    if not description or "at most" not in description or not isinstance(limit, int):
        return message
    return f"too large: {description}"


def _model_at(location: list) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in location:
        if isinstance(part, int):  # a position in a list: the list's items are the model found for the list
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _line_of(text: str, location: list) -> int | None:
    """1-based line of the deepest key (or list item, for a position) of `location` present in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in location:
        if isinstance(part, int):
            if not isinstance(node, yaml.SequenceNode) or not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line
