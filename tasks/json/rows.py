r"""Reading a source row (a file line, a Hub record) into the task's fields: the schema must be a usable JSON
Schema, the optional reference must validate against it; anything else is a `RowError` with one reason.

A reference given as text is read as JSON text when it parses, else as the string itself (a bare string such as
`hello` for `{"type": "string"}`); of the two readings the first that the schema admits is kept, so `123` is the
number 123 for `{"type": "integer"}` and the string "123" for `{"type": "string"}`. Text that starts with `{`,
`[` or `"` is always JSON text (a broken object is an error, not a string), so a string that itself looks like
JSON is written JSON-encoded: `"hi"` is the string hi, `"\"hi\""` the string "hi" with its quotes. A number too
large for a float (`1e400`, or `inf` in a row a source already decoded) is refused: it would pass any `maximum`."""

from __future__ import annotations

import json
import math
from typing import Any

from dgemma_ft.tasks.base import RowError, column
from dgemma_ft.tasks.json.json_text import DECODER, dumps_compact, syntax_error
from dgemma_ft.tasks.json.key_order import order_like_schema
from dgemma_ft.tasks.json.leaves import leaves
from dgemma_ft.tasks.json.messages import pointer, short, where
from dgemma_ft.tasks.json.schema_checks import schema_check, schema_errors, schema_failure

SCHEMA_COLUMNS = ("schema", "json_schema", "schema_json")
REFERENCE_COLUMNS = ("reference", "reference_json", "completion", "output", "answer")
PROMPT_COLUMNS = ("prompt", "prompt_text")
FACTS_COLUMNS = ("facts",)
FIELDS = {"schema": SCHEMA_COLUMNS, "reference": REFERENCE_COLUMNS, "prompt": PROMPT_COLUMNS,
          "facts": FACTS_COLUMNS}


def example_from_row(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The example fields of one row (`columns` maps a field to the row's column name)."""
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise RowError(f"columns: unknown field '{unknown[0]}'; the json task reads {', '.join(FIELDS)}")
    _, raw = column(row, columns, "schema", SCHEMA_COLUMNS)
    if raw is None:
        raise RowError(f"no schema column (looked for {', '.join(SCHEMA_COLUMNS)}); map one with "
                       f"columns: {{schema: NAME}}")
    schema = _json_field(raw, "schema")
    if not isinstance(schema, dict):
        raise RowError(f"schema must be a JSON object, got {type(schema).__name__}")
    schema_json = dumps_compact(schema)
    check, problem = schema_check(schema_json)
    if check is None:
        raise RowError(problem)
    _, raw_reference = column(row, columns, "reference", REFERENCE_COLUMNS)
    reference_json = None
    if raw_reference is not None and raw_reference != "":
        reference = _reference(raw_reference, check.validator)
        reference_json = dumps_compact(order_like_schema(reference, schema))
    _, facts = column(row, columns, "facts", FACTS_COLUMNS)
    return {"schema_json": schema_json, "reference_json": reference_json,
            "facts": facts.strip() if isinstance(facts, str) else "",
            "prompt_text": _prompt_text(column(row, columns, "prompt", PROMPT_COLUMNS)[1])}


def _reference(raw: Any, validator) -> Any:
    """The row's reference instance (see the module's docstring for how text is read)."""
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):  # already decoded by the source (a JSONL object, a Hub record)
        infinite = next(((at, leaf) for at, leaf in leaves(raw).items()
                         if isinstance(leaf, float) and not math.isfinite(leaf)), None)
        if infinite is not None:
            raise RowError(f"reference: {where(infinite[0])} holds {infinite[1]!r}, not a JSON number (JSON numbers "
                           f"are finite; 1e400 is out of range for a float)")
        return _follows(raw, validator)
    json_only = raw.lstrip()[:1] in ("{", "[", '"')
    try:
        value = DECODER.decode(raw)
    except (ValueError, RecursionError) as exc:
        if json_only:
            raise _not_json("reference", exc) from None
        problem = _mismatch(raw, validator)
        if problem is not None:
            raise RowError(f"{_not_json('reference', exc)}, and as a plain string it does not match the schema: "
                           f"{problem}") from None
        return raw
    problem = _mismatch(value, validator)
    if problem is None:
        return value
    if not json_only and _mismatch(raw, validator) is None:
        return raw  # `123` or `true` for a string schema
    raise RowError(f"reference does not match the schema: {problem}")


def _follows(value: Any, validator) -> Any:
    problem = _mismatch(value, validator)
    if problem is not None:
        raise RowError(f"reference does not match the schema: {problem}")
    return value


def _mismatch(value: Any, validator) -> str | None:
    """'<pointer>: <message>' for the first way `value` breaks the schema, or None when it follows it."""
    try:
        errors = schema_errors(validator, value, 1)
    except Exception as exc:  # a pattern past its time, an unresolvable $ref, a schema that recurses forever
        raise RowError(f"{schema_failure(exc)}, so the reference cannot be checked") from None
    return f"{where(pointer(errors[0].absolute_path))}: {short(errors[0].message)}" if errors else None


def _json_field(value: Any, what: str) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return DECODER.decode(value)
        except (ValueError, RecursionError) as exc:
            raise _not_json(what, exc) from None
    return value


def _not_json(what: str, exc: Exception) -> RowError:
    if isinstance(exc, json.JSONDecodeError):
        return RowError(f"{what} is not valid JSON ({syntax_error(exc)})")
    return RowError(f"{what} is not valid JSON ({short(str(exc) or type(exc).__name__, 80)})")


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):  # chat messages: [{"role": ..., "content": ...}, ...]
        parts = [m.get("content") for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        text = "\n".join(p for p in parts if p)
        return text or None
    return None
