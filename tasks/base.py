"""The task interface: how data is made or loaded, how an example becomes a prompt and a target, how an answer
is judged. Training and inference use nothing of a task beyond this file's `Task` class.

A task is a subclass of `Task` registered with `@register_task` (see `tasks/sudoku/` for one); other packages add
tasks through the entry-point group ``dgemma_ft.tasks`` (``name = "package.module:TaskClass"``). Everything a
task module needs is importable from here.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from dgemma_ft.errors import UserError
from dgemma_ft.strict_models import NumbersNotBooleans, first_pydantic_error
from dgemma_ft.tasks.dataset import build_dataset
from dgemma_ft.tasks.registry import register_task
from dgemma_ft.tasks.sources import RowError, SourceSpec

__all__ = ["RowError", "SourceSpec", "Task", "TaskOptions", "Verdict", "check_order", "column", "option_error",
           "register_task"]


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
    # The task fields a source's `columns:` map may name (the fields `from_row` reads); empty: not checked.
    column_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: TaskOptions | dict[str, Any] | None = None):
        if isinstance(options, TaskOptions):
            self.options = options
        else:
            try:  # model_validate, not Options(**options): a key that is not text must be an error, not a TypeError
                self.options = self.Options.model_validate(options or {})
            except ValidationError as exc:
                raise UserError(f"task '{self.name}': {first_pydantic_error(exc, 'task.options', self.Options)}") \
                    from None

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

    # ---- dataset (tasks/dataset.py does the work)
    def build_dataset(self, split: str, spec: SourceSpec | dict[str, Any] | None = None,
                      exclude_keys: Iterable[str] = ()):
        """A `datasets.Dataset` with chat `messages` plus the task's fields; see `dataset.build_dataset`."""
        return build_dataset(self, split, spec, exclude_keys)

    @classmethod
    def unknown_column(cls, columns: dict[str, str]) -> tuple[str, str] | None:
        """(first key of a `columns:` map that names no field this task reads, the fix), or None."""
        for key in columns if cls.column_fields else ():
            if key not in cls.column_fields:
                guess = difflib.get_close_matches(str(key), cls.column_fields, n=1)
                hint = f"did you mean '{guess[0]}'? " if guess else ""
                return str(key), (f"task '{cls.name}' reads no field '{key}'; {hint}the fields it reads are "
                                  f"{', '.join(cls.column_fields)} (columns maps a field to your column name)")
        return None


def column(row: dict[str, Any], columns: dict[str, str], field: str,
           candidates: tuple[str, ...]) -> tuple[str, Any]:
    """(column name, value) of a task field in a source row: the column `columns` maps the field to (which must
    exist), else the first of the default `candidates` holding a value, else (candidates[0], None)."""
    mapped = columns.get(field)
    if mapped is not None:
        if mapped not in row:
            raise RowError(f"missing column '{mapped}' (mapped to {field}); columns: {', '.join(map(str, row))}")
        return mapped, row[mapped]
    for name in candidates:
        if row.get(name) not in (None, ""):
            return name, row[name]
    return candidates[0], None


def option_error(task_name: str, message: str) -> PydanticCustomError:
    """A `task.options` error carrying `message` as written (braces are not format fields)."""
    return PydanticCustomError(f"{task_name}_options", message.replace("{", "{{").replace("}", "}}"))


def check_order(task_name: str, low_name: str, low: Any, high_name: str, high: Any) -> None:
    """Refuse options whose lower bound `low_name` exceeds their upper bound `high_name` (unset ones pass)."""
    if low is not None and high is not None and low > high:
        raise option_error(task_name, f"{low_name} ({low}) must not exceed {high_name} ({high})")
