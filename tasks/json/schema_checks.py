"""Checking an instance against a schema with `jsonschema`, bounded: the validator class follows the schema's
`$schema`, regular expressions run with a time limit (`patterns`), formats are checked (`formats`), and `$ref`s
are looked up only inside the schema (jsonschema's default registry would fetch remote ones over the network,
with no time limit). Every failure to apply a schema becomes one line."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.validators import extend, validator_for
from referencing import Registry
from referencing.exceptions import NoSuchAnchor, PointerToNowhere, Unresolvable

from dgemma_ft.tasks.json.formats import format_checker, unchecked_formats
from dgemma_ft.tasks.json.messages import pointer, short
from dgemma_ft.tasks.json.patterns import TIMED_KEYWORDS, PatternTimeout, pattern_budget

LOCAL_REFS = Registry()  # no `retrieve`: a `$ref` outside the schema is unresolvable, not downloaded


def validator_class(schema: Any) -> type:
    """The jsonschema validator class for the schema's `$schema` (Draft 2020-12 when absent or unknown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return validator_for(schema, default=Draft202012Validator)
    except Exception:  # an odd $schema value (a number, a list) falls back to the default
        return Draft202012Validator


@lru_cache(maxsize=None)
def timed_validator_class(cls: type) -> type:
    """`cls` with its regular-expression keywords run by `pattern_search` (so they cannot hang)."""
    return extend(cls, validators={k: f for k, f in TIMED_KEYWORDS.items() if k in cls.VALIDATORS})


@dataclass(frozen=True)
class SchemaCheck:
    """A usable schema: its validator and the `format` names it uses that are not checked."""

    validator: Any
    unchecked_formats: tuple[str, ...]


@lru_cache(maxsize=1024)
def schema_check(schema_json: str) -> tuple[SchemaCheck | None, str | None]:
    """(SchemaCheck, None) for a schema text, or (None, reason) when it cannot be used."""
    try:
        schema = json.loads(schema_json)
    except (ValueError, RecursionError) as exc:
        return None, f"the schema is not valid JSON ({exc})"
    cls = validator_class(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        return None, f"the schema is not a valid JSON Schema ({pointer(exc.absolute_path)}: {short(exc.message)})"
    except Exception as exc:  # deep or odd schemas
        return None, f"the schema cannot be checked ({type(exc).__name__})"
    validator = timed_validator_class(cls)(schema, format_checker=format_checker(cls), registry=LOCAL_REFS)
    return SchemaCheck(validator, unchecked_formats(schema, cls)), None


def schema_errors(validator, instance: Any, limit: int) -> list[SchemaViolation]:
    """The first `limit` errors of `instance`, all patterns together within the pattern budget. Raises what the
    schema raises: `PatternTimeout`, `RecursionError`, an unresolvable `$ref`."""
    with pattern_budget():
        return list(islice(validator.iter_errors(instance), limit))


def schema_failure(exc: Exception) -> str:
    """One line saying why applying a schema raised `exc` (from `schema_errors`) instead of judging."""
    if isinstance(exc, PatternTimeout):
        return f"the schema's {exc}"
    if isinstance(exc, RecursionError):
        return "the schema recurses too deeply"
    cause = exc.__cause__ if isinstance(exc.__cause__, Unresolvable) else exc  # jsonschema wraps referencing's
    if isinstance(cause, PointerToNowhere):
        return f"the schema's $ref '#{short(cause.ref, 80)}' points to nothing in the schema"
    if isinstance(cause, NoSuchAnchor):
        return f"the schema's $ref '#{short(cause.anchor, 80)}' names an anchor the schema does not define"
    if isinstance(cause, Unresolvable):
        return (f"the schema's $ref {short(cause.ref, 80)!r} cannot be resolved (only refs to places inside "
                f"the schema are followed; nothing is downloaded)")
    return f"the schema cannot be applied ({type(exc).__name__}: {short(str(exc), 80)})"
