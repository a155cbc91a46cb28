"""Tasks: one module per task (dataset + prompt format + validator), found through a registry."""

from dgemma_ft.tasks.base import SourceSpec, Task, TaskOptions, Verdict, get_task, register_task, task_names

__all__ = ["SourceSpec", "Task", "TaskOptions", "Verdict", "get_task", "register_task", "task_names"]
