"""dgemma-ft: fine-tune block-diffusion language models (DiffusionGemma) on structured tasks.

The Python API (`from dgemma_ft import Recipe, train, evaluate, generate, merge, push, check, estimate`) lives in
`dgemma_ft.api`; it is imported on first use (PEP 562), so `import dgemma_ft` and `dgemma-ft --help` stay fast."""

from __future__ import annotations

import importlib

from dgemma_ft.quiet import quiet_known_noise

# Before any module of the kit imports peft or bitsandbytes (bitsandbytes logs at its import), whether the CLI,
# the Python API, or a script importing kit modules directly: the narrow filters for known-harmless messages.
quiet_known_noise()

__version__ = "0.1.0"

API_NAMES = ("Recipe", "RunResult", "Report", "Generation", "MergeResult", "PushResult", "MemoryPlan", "train",
             "evaluate", "generate", "merge", "push", "check", "estimate")
__all__ = [*API_NAMES, "__version__"]


def __getattr__(name: str):
    if name in API_NAMES:
        value = getattr(importlib.import_module("dgemma_ft.api"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'dgemma_ft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API_NAMES})
