"""One-line messages for people: JSON pointers naming where in an instance something is, and long text (a
schema error quoting a huge value) cut to a line that keeps its head and its tail."""

from __future__ import annotations

from collections.abc import Iterable

MESSAGE_CHARS = 160  # longest error message kept


def escape_token(part: object) -> str:
    """One JSON-pointer reference token (RFC 6901: '~' as '~0', '/' as '~1')."""
    return str(part).replace("~", "~0").replace("/", "~1")


def pointer(path: Iterable[object]) -> str:
    """The JSON pointer of a path of keys and indexes ("" for the root)."""
    return "".join("/" + escape_token(part) for part in path)


def where(json_pointer: str) -> str:
    """A pointer as a person reads it: the root is "(root)"."""
    return json_pointer or "(root)"


def short(text: object, limit: int = MESSAGE_CHARS) -> str:
    """One line of at most `limit` characters; a long one keeps its head and its tail (jsonschema messages put
    the instance first and the rule last)."""
    text = str(text)
    if len(text) > 4 * limit:
        text = text[:2 * limit] + " " + text[-2 * limit:]
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = (limit - 5) // 3
    return f"{text[:head]} ... {text[-(limit - 5 - head):]}"
