"""The task interface: how data is made or loaded, how an example becomes a prompt and a target, how an answer
is judged. Training and inference use nothing of a task beyond this file's `Task` class.

A task is a subclass of `Task` registered with `@register_task`; third-party packages add tasks through the
entry-point group ``dgemma_ft.tasks`` (``name = "package.module:TaskClass"``).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from dgemma_ft.errors import DataError, UserError

ENTRY_POINT_GROUP = "dgemma_ft.tasks"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the shipped data folder (installed as dgemma_ft/data)
# Longest .jsonl line read as a row. A row is one example: the shipped rows are at most a few KB and JSON-schema
# rows with references rarely pass 100 KB, so a 10 MiB line is a broken or foreign file; reading it whole would
# hold it (and its parse) in memory, so it is skipped and counted as an unusable row instead.
MAX_LINE_BYTES = 10 * 2**20
MAX_REASON_CHARS = 200  # longest reason shown per unusable row in a report line


# ------------------------------------------------------------------------------------- numbers, not booleans
def wants_number(annotation: Any) -> bool:
    """Whether a field's type takes numbers (int or float, possibly inside Optional, a union, a list or a tuple)
    and not booleans."""
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


def _leaf_types(annotation: Any) -> set:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return set()
    if origin is not None:  # Union, X | Y, list[...], tuple[...]: what they hold
        return set().union(*(_leaf_types(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation}


def holds_boolean(value: Any) -> bool:
    """A boolean, or a list/tuple holding one (YAML reads `true`, `yes`, `on` as booleans)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


def boolean_number_error(value: Any, field_name: str | None = None) -> PydanticCustomError:
    shown = str(value).lower() if isinstance(value, bool) else next(str(v).lower() for v in value
                                                                    if isinstance(v, bool))
    ctx = {"value": shown} | ({"field": field_name} if field_name else {})
    return PydanticCustomError("number_not_boolean", "give a number, not the boolean {value}", ctx)


class NumbersNotBooleans(BaseModel):
    """Base for recipe models: a number field refuses `true`/`false`, which pydantic would otherwise read as 1/0
    (so `steps: true` would quietly mean one step)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is not None and holds_boolean(value) and wants_number(field_info.annotation):
            raise boolean_number_error(value)
        return value


def check_numbers(model: type[BaseModel], data: Any) -> None:
    """The same check for a nested model that does not derive from `NumbersNotBooleans` (e.g. `TinySpec`); the
    error's context names the field."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        field_info = model.model_fields.get(name) if isinstance(name, str) else None
        if field_info is not None and holds_boolean(value) and wants_number(field_info.annotation):
            raise boolean_number_error(value, name)


def describe_input(given: Any, message: str = "") -> str:
    """` (got X)` for an error message, or "" when X says nothing (absent, empty, a whole section) or the message
    already shows it; long values are cut."""
    if given is None or isinstance(given, dict) or (isinstance(given, (list, tuple, str)) and not given):
        return ""
    shown = repr(given)
    if len(shown) > 80:
        shown = shown[:60] + " ... " + shown[-15:]
    return "" if shown.lower() in message.lower() else f" (got {shown})"


def clean_message(message: str) -> str:
    """pydantic's message without its `Value error, ` / `Assertion failed, ` prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


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
MAX_SOURCE_ROWS = 10_000_000


class SourceSpec(NumbersNotBooleans):
    """Where a split's rows come from.

    source: ``generate`` (synthetic, seeded), a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a path
    under the shipped ``data/`` folder, or a Hub dataset ``hf:owner/name[:config][@split]``.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "generate"
    size: int | None = Field(default=None, gt=0, le=MAX_SOURCE_ROWS,
                             description="rows to generate, or the most rows to take; at most 10,000,000 "
                                         "(generating that many takes hours and its dataset tens of GB: use a "
                                         "file, or train for more steps)")
    seed: int = 0
    strict: bool = Field(default=False, description="reject the whole source when any row is unusable")
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> column name in the source")


class RowError(ValueError):
    """Raised by `Task.from_row` for a row that cannot be used; the message is the one-line reason."""


def resolve_data_path(path: str) -> Path:
    """A local path as given, else relative to the shipped data folder (so `sudoku4/dream_4x4.jsonl` works
    from anywhere)."""
    for candidate in (Path(path).expanduser(), DATA_DIR / path):
        if _exists(candidate):
            if candidate.is_dir():
                raise DataError(f"data source '{path}' is a folder; give a data file (.jsonl, .json, .csv or "
                                f".parquet) inside it, or 'generate'")
            return candidate
    raise DataError(f"data file not found: '{path}' (looked in the current folder and in {DATA_DIR}); "
                    f"give an existing .jsonl/.csv/.parquet path or 'generate'")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name with a NUL byte, or one too long for the file system
        return False


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


def row_unit(source: str) -> str:
    """What a source's row numbers count: lines of a .jsonl, items of a .json list, data rows otherwise."""
    suffix = Path(source).suffix.lower() if not source.startswith("hf:") else ""
    return {".jsonl": "line", ".json": "item"}.get(suffix, "row")


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Yield (row number, row dict) from a file or Hub dataset; an unusable row yields a `RowError` with the
    reason instead of stopping the whole source. Row numbers are 1-based lines for .jsonl, items for .json,
    data rows for .csv. A file that cannot be read as a whole (not UTF-8, not JSON) raises `DataError`."""
    if source.startswith("hf:"):
        yield from _read_hf(source, split)
        return
    path = resolve_data_path(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
    yield from readers[suffix](path)


def _open(path: Path, **kwargs):
    try:
        return path.open(**kwargs)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, line: int | None = None) -> DataError:
    line = line if line is not None else data.count(b"\n", 0, exc.start) + 1
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """Lines are read in bytes, at most `MAX_LINE_BYTES` each, so one huge line costs no more than that."""
    with _open(path, mode="rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(2**20)) and not rest.endswith(b"\n"):
                    pass
                yield number, RowError(f"longer than {MAX_LINE_BYTES // 2**20} MiB (a row is one example)")
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, raw, exc, number) from None
            if text.strip():
                yield number, parse_json_row(text)


def parse_json_row(text: str) -> dict[str, Any] | RowError:
    """One JSON object, or the `RowError` saying why the text is not one."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return RowError("JSON nested too deeply to read")
    return row if isinstance(row, dict) else RowError(f"not a JSON object (a {type(row).__name__})")


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    with _open(path, mode="rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; a .json source is a list of flat objects") \
            from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    for number, row in enumerate(rows, 1):
        yield number, row if isinstance(row, dict) else RowError(f"item {number} is not an object")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    with _open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            yield from enumerate(reader, 1)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
        except csv.Error as exc:
            raise DataError(f"{path}: near line {reader.line_num + 1}: not readable as CSV ({exc}); fix the file "
                            f"or convert it to .jsonl") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: cannot read parquet ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    yield from enumerate(table.to_pylist(), 1)


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
class TaskOptions(NumbersNotBooleans):
    """Base for a task's own options (the recipe's `task.options`). Unknown keys are errors; number options
    refuse booleans."""

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
    # The task fields a source's `columns:` map may name (the fields `from_row` reads); empty: not checked.
    column_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: TaskOptions | dict[str, Any] | None = None):
        if isinstance(options, TaskOptions):
            self.options = options
        else:
            try:  # model_validate, not Options(**options): a key that is not text must be an error, not a TypeError
                self.options = self.Options.model_validate(options or {})
            except ValidationError as exc:
                raise UserError(f"task '{self.name}': {_first_pydantic_error(exc, 'task.options', self.Options)}") \
                    from None

    @classmethod
    def unknown_column(cls, columns: dict[str, str]) -> tuple[str, str] | None:
        """(first key of a `columns:` map that names no field this task reads, the fix), or None."""
        if not cls.column_fields:
            return None
        for key in columns:
            if key not in cls.column_fields:
                guess = difflib.get_close_matches(str(key), cls.column_fields, n=1)
                hint = f"did you mean '{guess[0]}'? " if guess else ""
                return str(key), (f"task '{cls.name}' reads no field '{key}'; {hint}the fields it reads are "
                                  f"{', '.join(cls.column_fields)} (columns maps a field to your column name)")
        return None

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

        spec = self._spec(split, spec)
        excluded = set(exclude_keys)
        report = SourceReport(source=spec.source, unit=row_unit(spec.source))
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
                    example = self._from_row(row, spec.columns)
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
        report.announce(split)
        rows = [{"messages": [{"role": "user", "content": self.prompt(ex)},
                              {"role": "assistant", "content": self.target(ex)}], **ex} for ex in examples]
        return datasets.Dataset.from_list(rows)

    def _spec(self, split: str, spec: SourceSpec | dict[str, Any] | None) -> SourceSpec:
        """The source spec, validated, with its `columns:` checked against the fields this task reads."""
        if not isinstance(spec, SourceSpec):
            try:
                spec = SourceSpec.model_validate(spec or {})
            except ValidationError as exc:
                raise UserError(_first_pydantic_error(exc, f"task.{split}", SourceSpec)) from None
        unknown = self.unknown_column(spec.columns)
        if unknown is not None:
            raise UserError(f"task.{split}.columns.{unknown[0]}: {unknown[1]}")
        return spec

    def _from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        """`from_row`, with a row too deeply nested for Python's recursion made an unusable row."""
        try:
            return self.from_row(row, columns)
        except RecursionError:
            raise RowError("nested too deeply to read") from None

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
    unit: str = "row"  # what the numbers count: "line" (.jsonl), "item" (.json) or "row"

    def add_bad(self, number: int, reason: str) -> None:
        self.bad.append((number, reason))

    def summary(self, shown: int = 5) -> str:
        text = f"{len(self.bad)} unusable row(s) dropped"
        if self.bad:
            text += ": " + "; ".join(f"{self.unit} {n}: {_cut(r)}" for n, r in self.bad[:shown])
            if len(self.bad) > shown:
                text += f"; ... {len(self.bad) - shown} more"
        return text

    def announce(self, split: str) -> None:
        """One warning line on stderr when rows were dropped (the README promises they are reported; the
        report object alone reaches no one). Only the main process speaks in a distributed run."""
        if self.bad and os.environ.get("RANK", "0") == "0":
            print(f"warning: {split} source '{self.source}': {self.summary()}; fix or remove them, or set "
                  f"strict: true to refuse such a source", file=sys.stderr, flush=True)


def _cut(text: str, limit: int = MAX_REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def _first_pydantic_error(exc: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    """The first error as `prefix.key: what is wrong`, read naturally (no pydantic prefixes, the input shown once,
    the known keys for an unknown one)."""
    error = exc.errors()[0]
    location = [str(p) for p in error["loc"]]
    sub = (error.get("ctx") or {}).get("field")
    where = ".".join([prefix, *location, *([sub] if sub else [])])
    if error["type"] == "extra_forbidden" and model is not None and len(location) == 1:
        known = sorted(model.model_fields)
        guess = difflib.get_close_matches(location[0], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    message = clean_message(error["msg"])
    return f"{where}: {message}{describe_input(error.get('input'), message)}"


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


def task_class(name: str) -> type[Task] | None:
    """The class registered as `name`, or None (checks that need the task, such as `columns:`, can then run
    when a recipe is loaded, before any data is read)."""
    _load_builtin_and_plugins()
    return _REGISTRY.get(name)


def get_task(name: str, options: dict[str, Any] | TaskOptions | None = None) -> Task:
    """The task registered as `name`, built with `options`."""
    _load_builtin_and_plugins()
    if name not in _REGISTRY:
        raise UserError(f"task.name: unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](options)
