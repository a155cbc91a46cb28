"""The task registry: built-in tasks by name, and other packages' tasks through the entry-point group
``dgemma_ft.tasks`` (``name = "package.module:TaskClass"``)."""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from dgemma_ft.errors import UserError

if TYPE_CHECKING:
    from dgemma_ft.tasks.base import Task, TaskOptions

ENTRY_POINT_GROUP = "dgemma_ft.tasks"
BUILTIN_TASKS = ("sudoku", "json", "math")  # each a package of dgemma_ft.tasks named as it registers

_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_and_plugins() -> None:
    """Import the built-in task packages (each registers itself; imported here, not at the top, because they
    import this module) and load the plugins' entry points."""
    for package in BUILTIN_TASKS:
        importlib.import_module(f"dgemma_ft.tasks.{package}")
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
