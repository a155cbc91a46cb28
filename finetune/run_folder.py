"""The life of a run folder: one training at a time claims it, a run stopped before its first checkpoint can start
again, a finished run resumes to nothing, and `--resume` uses the newest checkpoint that is complete.

States of `train.output_dir`:
    fresh       nothing there (or an empty folder)
    unstarted   a run stopped before its first checkpoint (Ctrl-C, NaN, a crash): nothing worth keeping
    resumable   complete checkpoints, no finished model
    finished    the newest checkpoint reached `train.steps` and the final adapter/model was saved
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dgemma_ft.errors import UserError
from dgemma_ft.user_files import safetensors_damage

LOCK_NAME = ".lock"
INCOMPLETE_PREFIX = "incomplete-"
# what a run writes before its first checkpoint; restarting removes exactly these (nothing else in the folder)
STARTUP_FILES = ("recipe.yaml", "logs")
# torch.distributed.checkpoint folders of a sharded (FSDP) checkpoint: weights, optimizer state
SHARDED_WEIGHTS = "pytorch_model_fsdp"
SHARDED_FOLDERS = (SHARDED_WEIGHTS, "optimizer_")
SHARDED_DONE = ".metadata"  # written (through a rename) by the coordinator after every process wrote its shards


# ------------------------------------------------------------------------------------------------------ claiming
class RunLock:
    """An exclusive `flock` on RUN/.lock for the life of a training. The kernel drops it when the process dies
    (even on SIGKILL), so a crashed run never leaves a stale lock behind."""

    def __init__(self, handle: IO[str]):
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


def claim(run_dir: Path) -> RunLock:
    """Claim `run_dir` for this training, or refuse if another process holds it."""
    import fcntl  # imported here: POSIX only, and this module (read_log, for eval reports) imports on any OS

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"train.output_dir '{run_dir}' is in use by another training ({holder}); wait for it to "
                        f"finish, or choose another folder with --set train.output_dir=...") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return RunLock(handle)


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        return None
    return int(name[len("checkpoint-"):])


def checkpoints(checkpoint_dir: Path) -> list[Path]:
    """checkpoint-N folders by step, oldest first (complete or not)."""
    found = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete. Cheap: reads headers, not weights.
    The Trainer writes checkpoint-N in place, so a crash mid-save leaves it torn: every file `--resume` reads is
    checked here (the main process writes trainer_state.json last, but other processes may still be writing
    their RNG state or shards then)."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is corrupt"
    weights = sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin"))
    weights = [w for w in weights if w.name != "training_args.bin"]
    sharded = sorted(p for p in checkpoint.iterdir() if p.is_dir() and p.name.startswith(SHARDED_FOLDERS))
    if not weights and not any(p.name.startswith(SHARDED_WEIGHTS) for p in sharded):
        return "no weights"
    for file in weights:
        damaged = safetensors_damage(file) if file.suffix == ".safetensors" else _torch_file_torn(file)
        if damaged:
            return f"{file.name} is truncated or corrupt"
    for folder in sharded:
        if not (folder / SHARDED_DONE).is_file():
            return f"{folder.name} has no {SHARDED_DONE} (not every process finished writing its shards)"
    states = [checkpoint / name for name in ("optimizer.pt", "scheduler.pt", "scaler.pt")]
    for file in [*states, *sorted(checkpoint.glob("rng_state*.pth"))]:
        if file.exists() and _torch_file_torn(file):
            return f"{file.name} is truncated or corrupt"
    return None


def _torch_file_torn(file: Path) -> bool:
    """torch.save writes a zip archive; a torn write loses its central directory, which opening reads."""
    try:
        with zipfile.ZipFile(file):
            return False
    except (OSError, zipfile.BadZipFile):
        return True


def newest_complete_checkpoint(checkpoint_dir: Path, say=None, move_aside: bool = True) -> Path | None:
    """The newest complete checkpoint. With `move_aside` (the main process), incomplete newer ones are renamed
    `incomplete-checkpoint-N` (kept for inspection, out of the way of resuming and rotation), and `say` is told
    which and why; other processes only skip them."""
    for checkpoint in reversed(checkpoints(checkpoint_dir)):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint
        if not move_aside:
            continue
        aside = checkpoint.with_name(INCOMPLETE_PREFIX + checkpoint.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
        if say is not None:
            say(f"{checkpoint.name} is incomplete ({reason}); moved it to {aside.name}")
    return None


# -------------------------------------------------------------------------------------------------------- states
@dataclass
class RunState:
    kind: str  # fresh | unstarted | resumable | finished
    checkpoint: Path | None = None
    step: int = 0


def final_weights_saved(run_dir: Path) -> bool:
    return (run_dir / "adapter").is_dir() or (run_dir / "model").is_dir()


def inspect(run_dir: Path, steps: int, say=None, move_aside: bool = True) -> RunState:
    """Where the run in `run_dir` stands, for a recipe asking for `steps` steps. A folder with files of its own
    but no run (no recipe.yaml, checkpoint or final weights) counts as fresh: the run is written beside them."""
    checkpoint = newest_complete_checkpoint(run_dir / "checkpoints", say, move_aside) if run_dir.is_dir() else None
    if checkpoint is None:
        if final_weights_saved(run_dir):  # e.g. checkpoints deleted by hand after training
            return RunState("finished", step=_summary_steps(run_dir))
        return RunState("unstarted" if (run_dir / "recipe.yaml").exists() else "fresh")
    step = checkpoint_step(checkpoint)
    if step >= steps and final_weights_saved(run_dir):
        return RunState("finished", checkpoint, step)
    return RunState("resumable", checkpoint, step)


def _summary_steps(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def clear_unstarted(run_dir: Path) -> None:
    """Remove what a run stopped before its first checkpoint left (its recipe copy, logs); checkpoints moved aside
    as incomplete stay for inspection."""
    for name in STARTUP_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# ----------------------------------------------------------------------------------------------------------- log
def read_log(path: Path) -> list[dict]:
    """The records of train_log.jsonl; a torn line (a run killed mid-write) is skipped, not fatal."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
