"""JSON text in and out: the strict decoder that answers, schemas and references go through (`NaN` and
`Infinity` are not JSON, and a number too large for a float, such as `1e400`, is refused rather than read as
infinity, which would pass any `maximum`), compact dumping, and the example fields that hold JSON text."""

from __future__ import annotations

import json
import math
from typing import Any

from dgemma_ft.tasks.json.messages import short


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {short(text, 40)} is too large for a float")
    return value


DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def syntax_error(exc: json.JSONDecodeError, base: int = 0) -> str:
    """The decoder's message with the offset of the error (`base`: where the decoded text starts)."""
    return f"{exc.msg.removesuffix(' at')} at char {base + exc.pos}"


def dumps_compact(value: Any) -> str:
    """JSON without spaces, non-ASCII kept (the form of targets and stored fields)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def schema_of(example: dict[str, Any]) -> dict[str, Any]:
    """The example's schema as an object (a fresh copy)."""
    return json.loads(example["schema_json"])


def reference_of(example: dict[str, Any]) -> Any:
    """The example's reference instance (a fresh copy), or None when it has none. A reference of JSON `null`
    is stored as the text "null"; use `has_reference` to tell the two apart."""
    text = example.get("reference_json")
    return None if text is None else json.loads(text)


def has_reference(example: dict[str, Any]) -> bool:
    return example.get("reference_json") is not None
