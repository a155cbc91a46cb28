"""Finding the JSON in a model's answer: code fences stripped, prose before the first '{' or '[' skipped, text
after the value ignored; and where a draft answer first stops being JSON (the sampler's `violations`)."""

from __future__ import annotations

import json
import re
from typing import Any

from dgemma_ft.tasks.json.json_text import DECODER, syntax_error
from dgemma_ft.tasks.json.messages import short

MAX_INPUT = 200_000  # characters of an answer looked at at all
MAX_CHARS = 100_000  # characters of JSON handed to the decoder
CANDIDATES = 3  # '{' / '[' positions tried when leading prose itself holds brackets

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?")


def extract_json(text: str) -> tuple[Any, str | None, int]:
    """(value, None, start offset) for the first JSON value in a model's answer, else (None, reason, offset of
    the error). Code fences are stripped, prose before the first '{' or '[' skipped, text after the value
    ignored."""
    text = text[:MAX_INPUT]
    body, base = text, 0
    fence = _FENCE.search(text)
    if fence is not None:
        base = fence.end()
        close = text.find("```", base)
        body = text[base:close if close >= 0 else len(text)]

    def next_start(position: int) -> int:
        brace, bracket = body.find("{", position), body.find("[", position)
        return min((p for p in (brace, bracket) if p >= 0), default=-1)

    start = next_start(0)
    if start < 0:  # no object or array: maybe a bare scalar
        start = len(body) - len(body.lstrip())
        if start == len(body):
            return None, "no JSON found (empty answer)", base
    first_error: tuple[str, int] | None = None
    for _ in range(CANDIDATES):
        chunk = body[start:start + MAX_CHARS]
        failed_at = -1  # where the decoder gave up; a later try must start there or after (prose with braces)
        try:
            value, _ = DECODER.raw_decode(chunk)
            return value, None, base + start
        except json.JSONDecodeError as exc:
            reason = syntax_error(exc, base + start)
            if len(body) - start > MAX_CHARS and exc.pos >= len(chunk) - 1:
                reason = f"longer than {MAX_CHARS} characters"
            error = (reason, base + start + exc.pos)
            failed_at = start + max(exc.pos, 1)
        except RecursionError:
            error = ("nested too deeply to parse", base + start)
        except ValueError as exc:  # NaN/Infinity, integers too long to convert
            error = (short(str(exc), 80), base + start)
        first_error = first_error or error
        if failed_at < 0 or body[start] not in "{[":
            break
        start = next_start(failed_at)
        if start < 0:
            break
    if body[:1] and next_start(0) < 0:
        return None, f"no JSON object or array found ({first_error[0]})", first_error[1]
    return None, first_error[0], first_error[1]


def draft_violations(text: str) -> list[int]:
    """[offset of the first JSON syntax error] in a full-length draft of the target (the last character when
    the draft ends before the JSON does); [] when it parses or has no precise offset."""
    text = text[:MAX_CHARS]
    if not text:
        return []
    try:
        DECODER.decode(text)
        return []
    except json.JSONDecodeError as exc:
        return [min(exc.pos, len(text) - 1)]
    except ValueError:  # NaN/Infinity or an over-long integer: no precise offset
        return []
