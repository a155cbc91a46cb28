"""Pydantic rules shared by the recipe and the tasks' options: numbers refuse booleans, and errors read as one
natural line (`task.options.max_blanks: ...`), not pydantic's report."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


# ------------------------------------------------------------------------------------- numbers, not booleans
def wants_number(annotation: Any) -> bool:
    """Whether a field's type takes numbers (int or float, possibly inside Optional, a union, a list or a tuple)
    and not booleans."""
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


def _leaf_types(annotation: Any) -> set:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return set()
    if origin is not None:  # Union, X | Y, list[...], tuple[...]: what they hold
        return set().union(*(_leaf_types(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation}


def holds_boolean(value: Any) -> bool:
    """A boolean, or a list/tuple holding one (YAML reads `true`, `yes`, `on` as booleans)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


def boolean_number_error(value: Any, field_name: str | None = None) -> PydanticCustomError:
    shown = str(value).lower() if isinstance(value, bool) else next(str(v).lower() for v in value
                                                                    if isinstance(v, bool))
    ctx = {"value": shown} | ({"field": field_name} if field_name else {})
    return PydanticCustomError("number_not_boolean", "give a number, not the boolean {value}", ctx)


class NumbersNotBooleans(BaseModel):
    """Base for recipe models: a number field refuses `true`/`false`, which pydantic would otherwise read as 1/0
    (so `steps: true` would quietly mean one step)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is not None and holds_boolean(value) and wants_number(field_info.annotation):
            raise boolean_number_error(value)
        return value


def check_numbers(model: type[BaseModel], data: Any) -> None:
    """The same check for a nested model that does not derive from `NumbersNotBooleans` (e.g. `TinySpec`); the
    error's context names the field."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        field_info = model.model_fields.get(name) if isinstance(name, str) else None
        if field_info is not None and holds_boolean(value) and wants_number(field_info.annotation):
            raise boolean_number_error(value, name)


def describe_input(given: Any, message: str = "") -> str:
    """` (got X)` for an error message, or "" when X says nothing (absent, empty, a whole section) or the message
    already shows it; long values are cut."""
    if given is None or isinstance(given, dict) or (isinstance(given, (list, tuple, str)) and not given):
        return ""
    shown = repr(given)
    if len(shown) > 80:
        shown = shown[:60] + " ... " + shown[-15:]
    return "" if shown.lower() in message.lower() else f" (got {shown})"


def clean_message(message: str) -> str:
    """pydantic's message without its `Value error, ` / `Assertion failed, ` prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def first_pydantic_error(exc: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    """The first error as `prefix.key: what is wrong`, read naturally (no pydantic prefixes, the input shown once,
    the known keys for an unknown one)."""
    error = exc.errors()[0]
    location = [str(p) for p in error["loc"]]
    sub = (error.get("ctx") or {}).get("field")
    where = ".".join([prefix, *location, *([sub] if sub else [])])
    if error["type"] == "extra_forbidden" and model is not None and len(location) == 1:
        known = sorted(model.model_fields)
        guess = difflib.get_close_matches(location[0], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    message = clean_message(error["msg"])
    return f"{where}: {message}{describe_input(error.get('input'), message)}"

