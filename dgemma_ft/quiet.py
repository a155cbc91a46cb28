"""Library messages that are known to be harmless here, silenced one by one (by logger and message start, never
whole loggers), so a normal run prints only what a user can act on."""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings

# bitsandbytes (imported by peft and transformers' Trainer, so by every command that loads a model) probes the Hub
# for an optional CPU kernel at import and logs when it is not there; its own CPU code is used instead.
BNB_CPU_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
# With HF_HUB_OFFLINE=1 the `kernels` package first says it skips that probe's publisher check.
BNB_KERNEL_OFFLINE = ("kernels._internals.hf_hub",
                      "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
KNOWN_LOG_NOISE = (BNB_CPU_KERNEL, BNB_KERNEL_OFFLINE)
# transformers 5.2x deprecates the property; peft still reads it (nothing the user calls).
CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
MISSING_KEYS = "There were missing keys in the checkpoint model loaded: "


class _DropStartingWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_known_noise() -> None:
    """Install the narrow filters (idempotent). `import dgemma_ft` calls it, so before any library the kit uses
    is imported (by the CLI, the Python API, or a script importing kit modules): bitsandbytes logs once, at its
    import."""
    for logger_name, start in KNOWN_LOG_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropStartingWith) and f.start == start for f in logger.filters):
            logger.addFilter(_DropStartingWith(start))
    warnings.filterwarnings("ignore", message=CHECKPOINTING_DEPRECATION, category=FutureWarning)


class _SharedKeysFilter(logging.Filter):
    """Drops the Trainer's missing-keys report when every key it names is a second name of a shared Parameter."""

    def __init__(self, shared_names: set[str]):
        super().__init__()
        self.shared_names = shared_names

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(MISSING_KEYS):
            return True
        try:
            keys = ast.literal_eval(message[len(MISSING_KEYS):].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(keys, list) and set(keys) <= self.shared_names)


def shared_parameter_names(model) -> set[str]:
    """Every name of every Parameter that is reachable under more than one name (encoder and decoder layers of
    DiffusionGemma hold the same Parameters)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


@contextlib.contextmanager
def shared_keys_not_missing(model):
    """While resuming: checkpoints store each shared Parameter once, so the Trainer reports the other names as
    missing (a 3 KB list on the tiny model, every encoder key on the 26B) although loading fills them through
    the sharing. Keys that are not such aliases are still reported."""
    logger = logging.getLogger("transformers.trainer")
    keys_filter = _SharedKeysFilter(shared_parameter_names(model))
    logger.addFilter(keys_filter)
    try:
        yield
    finally:
        logger.removeFilter(keys_filter)
