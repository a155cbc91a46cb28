"""Judging one answer: its JSON is extracted and checked against the schema (bounded in size, depth and pattern
time), then, when the row has a reference, compared with it leaf by leaf for `correct` and `score`."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from dgemma_ft.tasks.base import Verdict
from dgemma_ft.tasks.json.extract import extract_json
from dgemma_ft.tasks.json.formats import format_note
from dgemma_ft.tasks.json.json_text import dumps_compact
from dgemma_ft.tasks.json.leaves import leaves, measure, same_leaf
from dgemma_ft.tasks.json.messages import pointer, short, where
from dgemma_ft.tasks.json.schema_checks import schema_check, schema_errors, schema_failure

MAX_DEPTH = 64  # deepest nesting that is checked against the schema
MAX_NODES = 1_000  # most JSON values that are checked against the schema (jsonschema costs ~5-50 us a value)
MAX_ERRORS = 20  # schema errors collected
SHOWN_PATHS = 10  # error paths kept in the verdict's details


@lru_cache(maxsize=1024)
def _reference_leaves(reference_json: str) -> dict[str, Any]:
    return leaves(json.loads(reference_json))


def judge(example: dict[str, Any], text: str, match_reference: bool) -> Verdict:
    """The verdict on answer `text`; `match_reference`: `correct` also needs the row's reference (if any)."""
    value, problem, offset = extract_json(text)
    if problem is not None:
        return Verdict(False, False, 0.0, f"not valid JSON: {problem}", {"error_offset": offset})
    details: dict[str, Any] = {"json_offset": offset}
    nodes, deepest = measure(value, MAX_NODES, MAX_DEPTH)
    if nodes > MAX_NODES or deepest > MAX_DEPTH:
        details["too_large"] = True
        what = f"more than {MAX_NODES} values" if nodes > MAX_NODES else f"nesting deeper than {MAX_DEPTH}"
        return Verdict(True, False, 0.0, f"JSON too large to check ({what})", details)

    check, schema_problem = schema_check(example["schema_json"])
    errors: list = []
    if check is not None:
        try:
            errors = schema_errors(check.validator, value, MAX_ERRORS)
        except Exception as exc:  # a pattern past its time, an unresolvable $ref, a regex `regex` cannot read, ...
            schema_problem = schema_failure(exc)
        if check.unchecked_formats:
            details["unchecked_formats"] = list(check.unchecked_formats)
    schema_ok = check is not None and schema_problem is None and not errors
    details["schema_valid"] = schema_ok
    paths = [pointer(e.absolute_path) for e in errors]
    details["errors"] = paths[:SHOWN_PATHS]
    details["error_count"] = len(errors)
    details["error_count_capped"] = len(errors) >= MAX_ERRORS

    reason = None
    if schema_problem is not None:
        reason = schema_problem
    elif errors:
        error = max(errors, key=lambda e: len(e.absolute_path))  # the most precise place (first if tied)
        reason = f"{where(pointer(error.absolute_path))}: {short(error.message)}"

    note = f"; {format_note(check.unchecked_formats)}" if check is not None and check.unchecked_formats else ""
    reference_json = example.get("reference_json")
    if reference_json is None or not match_reference:
        return Verdict(True, schema_ok, 1.0 if schema_ok else 0.0, reason or f"follows the schema{note}", details)

    expected, got = _reference_leaves(reference_json), leaves(value)
    matched = sum(1 for p, v in expected.items() if p in got and same_leaf(v, got[p]))
    total = len(expected.keys() | got.keys())
    details.update(leaves_matched=matched, leaves_expected=len(expected), leaves_total=total)
    equal = matched == total
    if reason is None and not equal:
        reason, details["first_mismatch"] = _first_mismatch(expected, got)
    return Verdict(True, schema_ok and equal, matched / total if total else 0.0,
                   reason or f"follows the schema and matches the reference{note}", details)


def _first_mismatch(expected: dict[str, Any], got: dict[str, Any]) -> tuple[str, str]:
    """(reason, pointer) for the first leaf that differs: a wrong value, else a missing one, else an extra one."""
    wrong = next((p for p in expected if p in got and not same_leaf(expected[p], got[p])), None)
    if wrong is not None:
        return (f"{where(wrong)}: expected {short(dumps_compact(expected[wrong]), 60)}, "
                f"got {short(dumps_compact(got[wrong]), 60)}"), wrong
    missing = next((p for p in expected if p not in got), None)
    if missing is not None:
        return f"{where(missing)}: missing (expected {short(dumps_compact(expected[missing]), 60)})", missing
    extra = next(p for p in got if p not in expected)
    return f"{where(extra)}: not in the reference", extra
