"""Read files a user or a crash may have damaged (configs, adapter records, weights), turning every way they can
be broken into one line that names the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from dgemma_ft.errors import UserError


def read_json_file(file: Path, fix: str, label: str = "") -> Any:
    """The parsed JSON of `file`; `label` (e.g. "model.name 'x': ") prefixes the error, `fix` ends it."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{label}{file} is not a text file; {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{label}{file} is not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from None
    except RecursionError:
        raise UserError(f"{label}{file} is nested too deeply to be a config; {fix}") from None


def safetensors_damage(file: Path) -> str | None:
    """Why a safetensors file cannot be loaded (a torn write, an overwritten header), or None. Reads the header
    only: safetensors checks that its offsets end exactly at the end of the file."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        return str(exc).splitlines()[0] or type(exc).__name__
    return None


def check_safetensors_header(file: Path, label: str = "") -> None:
    """The header of a safetensors file reads (a truncated or overwritten file fails here, not mid-load)."""
    damage = safetensors_damage(file)
    if damage is not None:
        where = f"{label}: " if label else ""
        raise UserError(f"{where}{file} is damaged ({damage}); restore it, or re-save what it holds")
