"""Which `format`s are checked: the draft's own format checks, plus Draft 2020-12's for the formats an older
draft does not define (`date` or `uuid` in a draft-04 schema). `date-time`, `time`, `uri`, `hostname`,
`duration`, ... need jsonschema's `format-nongpl` extra (a dependency of this package). The formats a schema
names that no check covers are found so that a verdict says so instead of passing them silently."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from dgemma_ft.tasks.json.messages import short

# The formats JSON Schema 2020-12 defines; one that is not checked here lacks the package its check needs.
STANDARD_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex"})
_INSTANCE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas


@lru_cache(maxsize=None)
def format_checker(cls: type) -> FormatChecker:
    """The format checks for validator class `cls`: its draft's, and Draft 2020-12's for the formats the draft
    does not define."""
    checker = FormatChecker(formats=())
    checker.checkers = {**Draft202012Validator.FORMAT_CHECKER.checkers, **cls.FORMAT_CHECKER.checkers}
    return checker


def unchecked_formats(schema: Any, cls: type) -> tuple[str, ...]:
    """The `format` names in `schema` that no check of `cls` covers (sorted): names JSON Schema does not
    define ("currency"), and standard ones whose checking package is missing."""
    known = format_checker(cls).checkers
    names, stack = set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("format"), str) and node["format"] not in known:
                names.add(node["format"])
            stack.extend(value for key, value in node.items() if key not in _INSTANCE_KEYWORDS)
        elif isinstance(node, list):
            stack.extend(node)
    return tuple(sorted(names))


def format_note(names: tuple[str, ...]) -> str:
    """"format 'x' is not checked: why" for a verdict's reason; "" when every format is checked."""
    parts = []
    for group, why in (([n for n in names if n in STANDARD_FORMATS], "install jsonschema[format-nongpl]"),
                       ([n for n in names if n not in STANDARD_FORMATS], "JSON Schema does not define {}")):
        if group:
            shown = ", ".join(repr(short(name, 40)) for name in group[:5]) + (", ..." if len(group) > 5 else "")
            one = len(group) == 1
            parts.append(f"format{'' if one else 's'} {shown} {'is' if one else 'are'} not checked: "
                         f"{why.format('it' if one else 'them')}")
    return "; ".join(parts)
