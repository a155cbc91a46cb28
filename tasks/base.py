"""The task interface: how data is made or loaded, how an example becomes a prompt and a target, how an answer
is judged. Training and inference use nothing of a task beyond this file's `Task` class.

A task is a subclass of `Task` registered with `@register_task`; third-party packages add tasks through the
entry-point group ``dgemma_ft.tasks`` (``name = "package.module:TaskClass"``).
"""

from __future__ import annotations

import csv
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dgemma_ft.errors import DataError, UserError

ENTRY_POINT_GROUP = "dgemma_ft.tasks"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the shipped data folder (installed as dgemma_ft/data)


# --------------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """How a model's answer was judged. `valid`: well-formed; `correct`: solves the task; `score`: partial
    credit in [0, 1]; `reason`: one line for a person; `details`: anything machine-readable."""

    valid: bool
    correct: bool
    score: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "correct": self.correct, "score": self.score, "reason": self.reason,
                "details": self.details}


# ---------------------------------------------------------------------------------------------------- sources
class SourceSpec(BaseModel):
    """Where a split's rows come from.

    source: ``generate`` (synthetic, seeded), a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a path
    under the shipped ``data/`` folder, or a Hub dataset ``hf:owner/name[:config][@split]``.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "generate"
    size: int | None = Field(default=None, gt=0, description="rows to generate, or the most rows to take")
    seed: int = 0
    strict: bool = Field(default=False, description="reject the whole source when any row is unusable")
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> column name in the source")


class RowError(ValueError):
    """Raised by `Task.from_row` for a row that cannot be used; the message is the one-line reason."""


def resolve_data_path(path: str) -> Path:
    """A local path as given, else relative to the shipped data folder (so `sudoku4/dream_4x4.jsonl` works
    from anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    shipped = DATA_DIR / path
    if shipped.exists():
        return shipped
    raise DataError(f"data file not found: '{path}' (looked in the current folder and in {DATA_DIR}); "
                    f"give an existing .jsonl/.csv/.parquet path or 'generate'")


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf:owner/name[:config][@split]`` -> (repo id, config, split)."""
    spec = source[len("hf:"):]
    split = None
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    config = None
    if ":" in spec:
        spec, config = spec.split(":", 1)
    if spec.count("/") != 1 or not all(spec.split("/")):
        raise DataError(f"bad Hub dataset source '{source}': write it as hf:owner/name[:config][@split]")
    return spec, config or None, split or None


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Yield (row number, row dict) from a file or Hub dataset; an unreadable row yields its exception instead
    of stopping the whole source. Row numbers are 1-based lines for .jsonl, data rows for .csv."""
    if source.startswith("hf:"):
        yield from _read_hf(source, split)
        return
    path = resolve_data_path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, DataError(f"{path}:{number}: not valid JSON ({exc.msg})")
                    continue
                yield number, row if isinstance(row, dict) else DataError(f"{path}:{number}: not a JSON object")
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for number, row in enumerate(rows, 1):
            yield number, row if isinstance(row, dict) else DataError(f"{path}: item {number} is not an object")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            yield from ((number, row) for number, row in enumerate(csv.DictReader(handle), 1))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises many types for a broken file
            raise DataError(f"{path}: cannot read parquet ({exc})") from None
        for number, row in enumerate(table.to_pylist(), 1):
            yield number, row
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .parquet")


def _read_hf(source: str, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    repo, config, hf_split = parse_hf_source(source)
    import datasets

    try:
        dataset = datasets.load_dataset(repo, config, split=hf_split or split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise DataError(f"cannot load Hub dataset '{repo}' (config {config!r}, split {hf_split or split!r}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check the id and "
                        f"your connection, or download it and point the source at a local file") from None
    for number, row in enumerate(dataset, 1):
        yield number, row


# ------------------------------------------------------------------------------------------------------ tasks
class TaskOptions(BaseModel):
    """Base for a task's own options (the recipe's `task.options`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Task(ABC):
    """One structured task. Subclasses set `name`, `Options`, and implement the abstract methods.

    Character offsets in `pinned` and `violations` index the *target text* (the assistant message), so they do
    not depend on any tokenizer.
    """

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    description: ClassVar[str] = ""
    # How many unusable rows to show in the report before summarising.
    max_reported_rows: ClassVar[int] = 5

    def __init__(self, options: TaskOptions | dict[str, Any] | None = None):
        if isinstance(options, TaskOptions):
            self.options = options
        else:
            try:
                self.options = self.Options(**(options or {}))
            except ValidationError as exc:
                raise UserError(f"task '{self.name}': {_first_pydantic_error(exc, 'task.options')}") from None

    # ---- data
    @abstractmethod
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        """`size` synthetic examples (task fields only), reproducible from `seed`."""

    @abstractmethod
    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        """Map one source row to the task's fields; raise `RowError("reason")` for a row that cannot be used."""

    def default_size(self, split: str) -> int:
        return 10_000 if split == "train" else 500

    # ---- format
    @abstractmethod
    def prompt(self, example: dict[str, Any]) -> str:
        """The user message."""

    @abstractmethod
    def target(self, example: dict[str, Any]) -> str:
        """The assistant message a perfect model writes."""

    def key(self, example: dict[str, Any]) -> str:
        """Identity of an example, used to keep evaluation examples out of training data."""
        return self.prompt(example)

    # ---- judging
    @abstractmethod
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        """Judge `output_text`. Must never raise on any string and must finish quickly."""

    def pinned(self, example: dict[str, Any]) -> dict[int, str]:
        """Target characters known in advance: {offset in target text: character}."""
        return {}

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Offsets of `partial_text` (a full-length draft of the target) that currently break a constraint."""
        return []

    # ---- dataset
    def build_dataset(self, split: str, spec: SourceSpec | dict[str, Any] | None = None,
                      exclude_keys: Iterable[str] = ()):
        """A `datasets.Dataset` with chat `messages` (user prompt, assistant target) plus the task's fields.

        Unusable rows are counted and reported (`self.last_report`), or rejected outright when `spec.strict`.
        Examples whose `key` is in `exclude_keys` are left out (generation draws more to keep `size`).
        """
        import datasets

        spec = spec if isinstance(spec, SourceSpec) else SourceSpec(**(spec or {}))
        excluded = set(exclude_keys)
        report = SourceReport(source=spec.source)
        if spec.source == "generate":
            size = spec.size or self.default_size(split)
            examples = self._generate_excluding(size, spec.seed, excluded, report)
        else:
            examples = []
            for number, row in read_rows(spec.source, split):
                if spec.size is not None and len(examples) >= spec.size:
                    break
                try:
                    if isinstance(row, Exception):
                        raise RowError(str(row))
                    example = self.from_row(row, spec.columns)
                except RowError as exc:
                    report.add_bad(number, str(exc))
                    if spec.strict:
                        raise DataError(f"{spec.source}: row {number}: {exc} (strict mode rejects the source)") \
                            from None
                    continue
                if excluded and self.key(example) in excluded:
                    report.excluded += 1
                    continue
                examples.append(example)
        if not examples:
            raise DataError(f"{spec.source}: no usable rows for task '{self.name}'"
                            + (f" ({report.summary()})" if report.bad else ""))
        report.used = len(examples)
        self.last_report = report
        rows = [{"messages": [{"role": "user", "content": self.prompt(ex)},
                              {"role": "assistant", "content": self.target(ex)}], **ex} for ex in examples]
        return datasets.Dataset.from_list(rows)

    def _generate_excluding(self, size: int, seed: int, excluded: set[str], report: SourceReport) -> list[dict]:
        examples: list[dict] = []
        seen: set[str] = set()
        attempt = 0
        while len(examples) < size:
            need = size - len(examples)
            batch = self.generate(need + math.ceil(need * 0.1) + 8, seed + 1_000_003 * attempt)
            for example in batch:
                key = self.key(example)
                if key in excluded:
                    report.excluded += 1
                    continue
                if key in seen:
                    continue
                seen.add(key)
                examples.append(example)
                if len(examples) == size:
                    break
            attempt += 1
            if attempt > 50:
                raise DataError(f"task '{self.name}': could only generate {len(examples)} distinct examples of "
                                f"{size} requested; lower the size or widen the task options")
        return examples


@dataclass
class SourceReport:
    """What happened to a source's rows: used, left out as evaluation examples, unusable (with reasons)."""

    source: str
    used: int = 0
    excluded: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)

    def add_bad(self, number: int, reason: str) -> None:
        self.bad.append((number, reason))

    def summary(self, shown: int = 5) -> str:
        text = f"{len(self.bad)} unusable row(s)"
        if self.bad:
            text += ": " + "; ".join(f"row {n}: {r}" for n, r in self.bad[:shown])
            if len(self.bad) > shown:
                text += f"; ... {len(self.bad) - shown} more"
        return text


def _first_pydantic_error(exc: ValidationError, prefix: str) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in (prefix, *error["loc"]))
    return f"{where}: {error['msg']}"


# --------------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_and_plugins() -> None:
    import importlib

    for module in ("sudoku", "json_schema", "math_reasoning"):
        try:
            importlib.import_module(f"dgemma_ft.tasks.{module}")
        except ModuleNotFoundError as exc:  # a built-in module not written yet must not hide the others
            if exc.name != f"dgemma_ft.tasks.{module}":
                raise
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _REGISTRY:
            cls = entry.load()
            _REGISTRY.setdefault(entry.name, cls)


def task_names() -> list[str]:
    _load_builtin_and_plugins()
    return sorted(_REGISTRY)


def get_task(name: str, options: dict[str, Any] | TaskOptions | None = None) -> Task:
    """The task registered as `name`, built with `options`."""
    _load_builtin_and_plugins()
    if name not in _REGISTRY:
        raise UserError(f"task.name: unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](options)
