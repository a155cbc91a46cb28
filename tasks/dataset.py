"""Turn a task's source (generated, a file, a Hub dataset) into the `datasets.Dataset` training and evaluation
read: chat `messages` plus the task's fields, evaluation examples left out, unusable rows counted and reported."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
from pydantic import ValidationError

from dgemma_ft.errors import DataError, UserError
from dgemma_ft.strict_models import first_pydantic_error
from dgemma_ft.tasks.sources import MAX_REASON_CHARS, RowError, SourceSpec, read_rows, row_unit

if TYPE_CHECKING:
    from dgemma_ft.tasks.base import Task

MAX_GENERATE_ATTEMPTS = 50  # generator draws before a size that the options cannot reach is declared out of reach


def build_dataset(task: Task, split: str, spec: SourceSpec | dict[str, Any] | None = None,
                  exclude_keys: Iterable[str] = ()) -> datasets.Dataset:
    """A `datasets.Dataset` with chat `messages` (user prompt, assistant target) plus the task's fields.

    Unusable rows are counted and reported (`task.last_report`), or reject the source when `spec.strict`.
    Examples whose `key` is in `exclude_keys` are left out (generation draws more to keep `size`).
    """
    spec = validated_spec(task, split, spec)
    excluded = set(exclude_keys)
    report = SourceReport(source=spec.source, unit=row_unit(spec.source))
    if spec.source == "generate":
        examples = generate_excluding(task, spec.size or task.default_size(split), spec.seed, excluded, report)
    else:
        examples = read_examples(task, split, spec, excluded, report)
    if not examples:
        raise DataError(f"{spec.source}: no usable rows for task '{task.name}'"
                        + (f" ({report.summary()})" if report.bad else ""))
    report.used = len(examples)
    task.last_report = report
    report.announce(split)
    rows = [{"messages": [{"role": "user", "content": task.prompt(ex)},
                          {"role": "assistant", "content": task.target(ex)}], **ex} for ex in examples]
    return datasets.Dataset.from_list(rows)


def validated_spec(task: Task, split: str, spec: SourceSpec | dict[str, Any] | None) -> SourceSpec:
    """The source spec, validated, with its `columns:` checked against the fields the task reads."""
    if not isinstance(spec, SourceSpec):
        try:
            spec = SourceSpec.model_validate(spec or {})
        except ValidationError as exc:
            raise UserError(first_pydantic_error(exc, f"task.{split}", SourceSpec)) from None
    unknown = task.unknown_column(spec.columns)
    if unknown is not None:
        raise UserError(f"task.{split}.columns.{unknown[0]}: {unknown[1]}")
    return spec


def read_examples(task: Task, split: str, spec: SourceSpec, excluded: set[str],
                  report: SourceReport) -> list[dict[str, Any]]:
    """The usable examples of a file or Hub source, at most `spec.size`, the excluded ones left out."""
    examples: list[dict[str, Any]] = []
    for number, row in read_rows(spec.source, split):
        if spec.size is not None and len(examples) >= spec.size:
            break
        try:
            if isinstance(row, Exception):
                raise RowError(str(row))
            example = task.from_row(row, spec.columns)
        except RecursionError:  # a row nested deeper than Python's recursion reads
            example = None
            row = RowError("nested too deeply to read")
        except RowError as exc:
            example, row = None, exc
        if example is None:
            report.add_bad(number, str(row))
            if spec.strict:
                raise DataError(f"{spec.source}: row {number}: {row} (strict mode rejects the source)")
            continue
        if excluded and task.key(example) in excluded:
            report.excluded += 1
            continue
        examples.append(example)
    return examples


def generate_excluding(task: Task, size: int, seed: int, excluded: set[str], report: SourceReport) -> list[dict]:
    """`size` distinct generated examples none of whose keys is excluded (drawing more seeds as needed)."""
    examples: list[dict] = []
    seen: set[str] = set()
    attempt = 0
    while len(examples) < size:
        need = size - len(examples)
        batch = task.generate(need + math.ceil(need * 0.1) + 8, seed + 1_000_003 * attempt)
        for example in batch:
            key = task.key(example)
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
        if attempt > MAX_GENERATE_ATTEMPTS:
            raise DataError(f"task '{task.name}': could only generate {len(examples)} distinct examples of "
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
