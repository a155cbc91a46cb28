"""Reading a model's answer: the grid it wrote, found leniently among separators, box rules and prose."""

from __future__ import annotations

import re
from functools import lru_cache

MAX_SCAN = 100_000  # characters of an answer the validator reads; a grid is at most 81 digits plus separators

_SEP = r"[ \t\r\f\v|+\-,;.\[\](){}'\"`*=#~\u2500-\u257f]"
_SEP_ALL = re.compile(r"(?:\s|" + _SEP + r")+")
_NOT_DIGIT = re.compile(r"[^0-9]+")


@lru_cache(maxsize=16)
def _patterns(n: int) -> tuple[re.Pattern, re.Pattern]:
    line = rf"{_SEP}*(?:[0-9]{_SEP}*){{{n}}}"
    by_rows = re.compile(rf"(?m)^{line}(?:\n(?:{_SEP}*\n)*{line}){{{n - 1}}}$")
    run = re.compile(rf"(?<![0-9])[0-9]{{{n * n}}}")
    return by_rows, run


def read_grid(text: str, n: int) -> tuple[str | None, int]:
    """The first n*n cells of an answer and how many digits were found. Tried in order: n lines of n digits each
    (separators and separator-only lines allowed), then the first unbroken run of n*n digits once separators are
    dropped (so '4x4' in a preamble is not read as cells), then simply the first n*n digits."""
    window = text[:MAX_SCAN]
    by_rows, run = _patterns(n)
    match = by_rows.search(window)
    if match:
        return _NOT_DIGIT.sub("", match.group()), n * n
    compact = _SEP_ALL.sub("", window)
    match = run.search(compact)
    if match:
        return match.group(), n * n
    digits = _NOT_DIGIT.sub("", compact)
    if len(digits) >= n * n:
        return digits[:n * n], n * n
    return None, len(digits)
