"""Tasks: one small package per task (options, data, prompt format, judging, sampler hooks), found through a
registry by name. `base.py` is the interface a task implements."""

from dgemma_ft.tasks.base import RowError, Task, TaskOptions, Verdict, column, option_error
from dgemma_ft.tasks.registry import get_task, register_task, task_class, task_names
from dgemma_ft.tasks.sources import DATA_DIR, SourceSpec

__all__ = ["DATA_DIR", "RowError", "SourceSpec", "Task", "TaskOptions", "Verdict", "column", "get_task",
           "option_error", "register_task", "task_class", "task_names"]
