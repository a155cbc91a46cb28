"""Read JSON files a user or a crash may have damaged (configs, adapter records), turning every way they can be
broken into one line that names the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
