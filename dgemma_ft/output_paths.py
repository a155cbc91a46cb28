"""Check output paths before the work that fills them starts: an hour of training or evaluation must not end in
a failed save because the folder is a file, sits under a file, or cannot be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dgemma_ft.errors import UserError


def require_writable_dir(path: str | Path, what: str) -> Path:
    """`path` is, or can become, a folder this process can write into. `what` names the field or option
    (e.g. "train.output_dir", "--out") for the error line. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder; choose a folder path")
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        raise UserError(f"{what} '{path}': '{ancestor}' is a file, so no folder can be made under it; choose "
                        f"another path")
    if not _can_write_in(ancestor):
        raise UserError(f"{what} '{path}': '{ancestor}' is not writable; choose a folder you can write to")
    return path


def require_writable_file(path: str | Path, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` can be written as a file (its folder can be made and written), with one of `suffixes` if given."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{what} '{path}': give a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a file name")
    require_writable_dir(path.parent, what)
    return path


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _can_write_in(folder: Path) -> bool:
    """Probe by creating (and removing) a folder: `os.access` says yes to root even on read-only mounts."""
    try:
        probe = tempfile.mkdtemp(prefix=".dgemma-ft-probe-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True
