"""Schema regular expressions that cannot hang: `pattern`, `patternProperties` and `additionalProperties` (which
matches keys against `patternProperties`) run with the `regex` package and a time limit, so a catastrophic
pattern is reported as such instead of backtracking for minutes (Python's `re` cannot be stopped)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import regex
from jsonschema.exceptions import ValidationError as SchemaViolation

from dgemma_ft.tasks.json.messages import short

# A schema's `pattern` runs on every string it covers; a catastrophic one (`(a|a)+$` on 40 a's and a '!') backtracks
# for minutes in Python's `re`. Patterns run with the `regex` package, which can stop a search: each may take at most
# PATTERN_SECONDS, and all patterns of one validation together at most PATTERN_BUDGET_SECONDS.
PATTERN_SECONDS = 0.1
PATTERN_BUDGET_SECONDS = 0.5


class PatternTimeout(Exception):
    """A schema pattern that ran past its time limit (catastrophic backtracking); the message names it."""


_deadline = threading.local()


@contextmanager
def pattern_budget(seconds: float = PATTERN_BUDGET_SECONDS):
    """Bound the time all pattern searches inside the block take together."""
    _deadline.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _deadline.at = None


@lru_cache(maxsize=4096)
def _compiled(pattern: str):
    """The compiled pattern; a pattern `regex` cannot read raises `regex.error` (never run unbounded with `re`)."""
    return regex.compile(pattern)


def pattern_search(pattern: str, text: str) -> bool:
    """`re.search(pattern, text)` as jsonschema does it, but stopped with `PatternTimeout` after PATTERN_SECONDS
    (or what is left of the surrounding `pattern_budget`)."""
    compiled = _compiled(pattern)
    limit = PATTERN_SECONDS
    at = getattr(_deadline, "at", None)
    if at is not None:
        limit = min(limit, at - time.monotonic())
    try:
        if limit <= 0:
            raise TimeoutError
        return compiled.search(text, timeout=limit) is not None
    except TimeoutError:
        raise PatternTimeout(f"pattern {short(pattern, 60)!r} takes too long to check (over {PATTERN_SECONDS} s "
                             f"on a {len(text)}-character string); simplify it") from None


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not pattern_search(pattern, instance):
        yield SchemaViolation(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if pattern_search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, allowed, instance, schema):
    """jsonschema's `additionalProperties`, with `patternProperties` matched by `pattern_search`."""
    if not validator.is_type(instance, "object"):
        return
    named, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
    extras = sorted((key for key in instance
                     if key not in named and not any(pattern_search(p, key) for p in patterns)), key=str)
    if validator.is_type(allowed, "object"):
        for key in extras:
            yield from validator.descend(instance[key], allowed, path=key)
    elif not allowed and extras:
        shown = ", ".join(repr(key) for key in extras)
        if patterns:
            yield SchemaViolation(f"{shown} {'does' if len(extras) == 1 else 'do'} not match any of the regexes: "
                                  f"{', '.join(repr(p) for p in sorted(patterns))}")
        else:
            yield SchemaViolation(f"Additional properties are not allowed ({shown} "
                                  f"{'was' if len(extras) == 1 else 'were'} unexpected)")


TIMED_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
                  "additionalProperties": _additional_properties}


