"""JSON that follows a schema: given a JSON Schema (and, for generated data, a short text stating the values to put
in), write one JSON instance that validates.

Data: small synthetic schemas drawn from a built-in vocabulary (person, order, device, event, book) with a
matching reference instance and a facts text that states every value; or rows read from files and Hub datasets
with a schema and optionally a reference (the shipped json-mode-eval copy; JSONSchemaBench-style collections of
schemas only).

Fields of an example (all JSON-able, so `datasets` keeps one column type across rows):
  schema_json     the schema as compact JSON text (use `schema_of(example)` for the object)
  reference_json  a reference instance as compact JSON text, keys in schema order, or None (evaluation only:
                  the target is then "")
  facts           the values to put in, as text ("" when the source has none)
  prompt_text     the source's own prompt, or None

Judging: the answer's JSON is extracted (code fences stripped, leading prose skipped, trailing text ignored),
parsed, and checked with `jsonschema` (draft from `$schema`, default 2020-12) with format checking. `valid`: it
parses; `correct`: it validates and, when there is a reference (and `match_reference`), equals it field by field
(every leaf at the same JSON pointer, numbers compared numerically, no extra leaves). `score`: leaves matched over
the union of the reference's and the answer's leaves, or 1/0 for schema validity without a reference. To bound
the time per answer (jsonschema costs ~5-50 us a value), at most 100,000 characters are parsed, and an answer
with more than 1,000 values or nested deeper than 64 levels is reported as valid JSON that was not checked.
Only the formats jsonschema checks without extra packages are enforced (date, email, ipv4/6, uuid, regex, ...;
not date-time).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import date, timedelta
from functools import lru_cache
from itertools import islice
from typing import Any

import regex
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.validators import extend, validator_for
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from dgemma_ft.errors import UserError
from dgemma_ft.tasks.base import RowError, Task, TaskOptions, Verdict, register_task

SCHEMA_COLUMNS = ("schema", "json_schema", "schema_json")
REFERENCE_COLUMNS = ("reference", "reference_json", "completion", "output", "answer")
PROMPT_COLUMNS = ("prompt", "prompt_text")
FACTS_COLUMNS = ("facts",)
FIELDS = {"schema": SCHEMA_COLUMNS, "reference": REFERENCE_COLUMNS, "prompt": PROMPT_COLUMNS,
          "facts": FACTS_COLUMNS}

MAX_INPUT = 200_000  # characters of an answer looked at at all
MAX_CHARS = 100_000  # characters of JSON handed to the decoder
MAX_DEPTH = 64  # deepest nesting that is checked against the schema
MAX_NODES = 1_000  # most JSON values that are checked against the schema (jsonschema costs ~5-50 us a value)
MAX_ERRORS = 20  # schema errors collected
SHOWN_PATHS = 10  # error paths kept in the verdict's details
MESSAGE_CHARS = 160  # longest error message kept
CANDIDATES = 3  # '{' / '[' positions tried when leading prose itself holds brackets
GENERATE_TRIES = 30  # draws for one example before the prompt budget is declared out of reach
# A schema's `pattern` runs on every string it covers; a catastrophic one (`(a|a)+$` on 40 a's and a '!') backtracks
# for minutes in Python's `re`. Patterns run with the `regex` package, which can stop a search: each may take at most
# PATTERN_SECONDS, and all patterns of one validation together at most PATTERN_BUDGET_SECONDS.
PATTERN_SECONDS = 0.1
PATTERN_BUDGET_SECONDS = 0.5
INSTRUCTION = "Write JSON that follows this schema."

_FORMAT_CHECKER = FormatChecker()
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?")


def _option_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("json_options", message.replace("{", "{{").replace("}", "}}"))


class JsonSchemaOptions(TaskOptions):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    max_depth: int = Field(2, ge=0, le=4, description="container levels below the root object in generated "
                                                       "schemas: 0 flat, 1 objects/lists, 2 lists of objects")
    min_properties: int = Field(2, ge=1, le=8, description="fewest top-level properties in a generated schema")
    max_properties: int = Field(5, ge=1, le=8, description="most top-level properties in a generated schema")
    formats: bool = Field(True, description="generated date/email strings carry `format` (checked when judging)")
    compact_schema: bool = Field(True, description="print the schema in the prompt without spaces after , and :")
    max_prompt_chars: int | None = Field(400, ge=120, description="generated prompts stay within this many "
                                                                  "characters (properties are dropped or the "
                                                                  "schema redrawn); None: no limit")
    shuffle_facts: bool = Field(False, description="state generated facts in random order instead of schema order")
    match_reference: bool = Field(True, description="`correct` also needs the answer to equal the reference when "
                                                    "a row has one; turn off for sets whose prompts do not state "
                                                    "the values")

    @field_validator("max_properties")
    @classmethod
    def _properties(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_properties")
        if low is not None and low > value:
            raise _option_error(f"min_properties ({low}) must not exceed max_properties ({value})")
        return value


# ------------------------------------------------------------------------------------------------- helpers
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def dumps_compact(value: Any) -> str:
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


def validator_class(schema: Any) -> type:
    """The jsonschema validator class for the schema's `$schema` (Draft 2020-12 when absent or unknown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return validator_for(schema, default=Draft202012Validator)
    except Exception:  # an odd $schema value (a number, a list) falls back to the default
        return Draft202012Validator


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
        raise PatternTimeout(f"pattern {_short(pattern, 60)!r} takes too long to check (over {PATTERN_SECONDS} s "
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


_TIMED_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
                   "additionalProperties": _additional_properties}


@lru_cache(maxsize=None)
def timed_validator_class(cls: type) -> type:
    """`cls` with its regular-expression keywords run by `pattern_search` (so they cannot hang)."""
    return extend(cls, validators={k: f for k, f in _TIMED_KEYWORDS.items() if k in cls.VALIDATORS})


@lru_cache(maxsize=1024)
def _validator(schema_json: str):
    """(validator, None) for a schema text, or (None, reason) when it cannot be used."""
    try:
        schema = json.loads(schema_json)
    except (ValueError, RecursionError) as exc:
        return None, f"the schema is not valid JSON ({exc})"
    cls = validator_class(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        return None, f"the schema is not a valid JSON Schema ({_pointer(exc.absolute_path)}: {_short(exc.message)})"
    except Exception as exc:  # deep or odd schemas
        return None, f"the schema cannot be checked ({type(exc).__name__})"
    return timed_validator_class(cls)(schema, format_checker=_FORMAT_CHECKER), None


@lru_cache(maxsize=1024)
def _reference_leaves(reference_json: str) -> dict[str, Any]:
    return _leaves(json.loads(reference_json))


def _pointer(path) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _where(pointer: str) -> str:
    return pointer or "(root)"


def _short(text: str, limit: int = MESSAGE_CHARS) -> str:
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


def _leaves(value: Any) -> dict[str, Any]:
    """{JSON pointer: leaf} for every scalar and every empty object/array (iterative: any depth)."""
    out: dict[str, Any] = {}
    stack = [("", value)]
    while stack:
        pointer, node = stack.pop()
        if isinstance(node, dict) and node:
            for key, child in node.items():
                stack.append((pointer + "/" + str(key).replace("~", "~0").replace("/", "~1"), child))
        elif isinstance(node, list) and node:
            for index, child in enumerate(node):
                stack.append((f"{pointer}/{index}", child))
        else:
            out[pointer] = node
    return out


def _same(a: Any, b: Any) -> bool:
    """Leaf equality: numbers numerically (1 == 1.0), booleans only with booleans, the rest by type and value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _measure(value: Any, node_limit: int, depth_limit: int) -> tuple[int, int]:
    """(values, deepest level), counting stops early past the limits."""
    nodes, deepest = 0, 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        deepest = max(deepest, depth)
        if nodes > node_limit or deepest > depth_limit:
            break
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return nodes, deepest


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
            value, _ = _DECODER.raw_decode(chunk)
            return value, None, base + start
        except json.JSONDecodeError as exc:
            reason = f"{exc.msg} at char {base + start + exc.pos}"
            if len(body) - start > MAX_CHARS and exc.pos >= len(chunk) - 1:
                reason = f"longer than {MAX_CHARS} characters"
            error = (reason, base + start + exc.pos)
            failed_at = start + max(exc.pos, 1)
        except RecursionError:
            error = ("nested too deeply to parse", base + start)
        except ValueError as exc:  # NaN/Infinity, integers too long to convert
            error = (_short(str(exc), 80), base + start)
        first_error = first_error or error
        if failed_at < 0 or body[start] not in "{[":
            break
        start = next_start(failed_at)
        if start < 0:
            break
    if body[:1] and next_start(0) < 0:
        return None, f"no JSON object or array found ({first_error[0]})", first_error[1]
    return None, first_error[0], first_error[1]


def _resolve(schema: Any, root: Any, depth: int = 0) -> Any:
    """Follow a local `$ref` ("#", "#/$defs/x") a few times; anything else is returned as is."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 8:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return schema
        target: Any = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return schema
        schema, depth = target, depth + 1
    return schema


def _subschemas(schema: Any, root: Any) -> list[dict]:
    """The schema and the subschemas whose `properties`/`items` also describe the same instance."""
    out, stack, seen = [], [schema], 0
    while stack and seen < 32:
        node = _resolve(stack.pop(0), root)
        seen += 1
        if not isinstance(node, dict):
            continue
        out.append(node)
        for keyword in ("allOf", "anyOf", "oneOf"):
            if isinstance(node.get(keyword), list):
                stack.extend(node[keyword])
        for keyword in ("then", "else"):
            if isinstance(node.get(keyword), dict):
                stack.append(node[keyword])
    return out


def order_like_schema(value: Any, schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A copy of `value` whose object keys follow the order of the schema's `properties` (others keep their
    order, after them)."""
    root = schema if root is None else root
    if depth > 100:
        return value
    parts = _subschemas(schema, root)
    if isinstance(value, dict):
        order: dict[str, Any] = {}
        for part in parts:
            properties = part.get("properties")
            if isinstance(properties, dict):
                for name, sub in properties.items():
                    order.setdefault(name, sub)
        keys = [k for k in order if k in value] + [k for k in value if k not in order]
        return {k: order_like_schema(value[k], order.get(k, {}), root, depth + 1) for k in keys}
    if isinstance(value, list):
        out = []
        for index, item in enumerate(value):
            sub: Any = {}
            for part in parts:
                prefix = part.get("prefixItems")
                items = part.get("items")
                if isinstance(prefix, list) and index < len(prefix):
                    sub = prefix[index]
                elif isinstance(items, list):
                    sub = items[index] if index < len(items) else {}
                elif isinstance(items, dict):
                    sub = items
                if sub:
                    break
            out.append(order_like_schema(item, sub, root, depth + 1))
        return out
    return value


# ------------------------------------------------------------------------------------------------ vocabulary
FIRST = ["Ada", "Bo", "Cleo", "Dan", "Eva", "Femi", "Gus", "Hana", "Ivan", "Jia", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Wen", "Yara", "Zoe"]
LAST = ["Lopez", "Chen", "Okafor", "Smith", "Novak", "Ito", "Berg", "Costa", "Khan", "Moreau", "Rossi", "Silva",
        "Weber", "Kim", "Ali", "Dubois"]
CITIES = ["Lyon", "Oslo", "Lima", "Pune", "Cork", "Kyoto", "Porto", "Austin", "Accra", "Graz", "Quito", "Perth"]
COUNTRIES = ["France", "Norway", "Peru", "India", "Ireland", "Japan", "Portugal", "Ghana", "Austria", "Chile"]
STREETS = ["Oak St", "Mill Rd", "Park Ave", "High St", "Lake Dr", "Elm Way", "King Rd", "Bay St"]
WORDS = ["red", "blue", "green", "fast", "new", "eco", "sale", "gift", "home", "work", "kids", "sport"]
SKILLS = ["python", "sql", "design", "sales", "cooking", "driving", "french", "excel", "welding", "math"]
TITLES = ["Blue River", "Night Train", "Small Gods", "Cold Stars", "The Long Road", "Paper Moon", "Iron Bay",
          "Quiet Fire", "Open Sky", "Red Harbor"]
MODELS = ["X100", "Pixel 7", "Note 9", "T480", "Echo 2", "Zen 5", "Nova", "Orbit S"]
DOMAINS = ["mail.com", "web.io", "inbox.org", "post.net"]

# kind: ("person",) ("pick", pool) ("code", prefix) ("int", lo, hi) ("num", lo, hi, decimals) ("bool",)
#       ("enum", options) ("date",) ("email",) ("list", item kind) ("obj", [properties]) ("objlist", [properties])
PROPERTIES: dict[str, tuple] = {
    "name": ("person",), "city": ("pick", CITIES), "country": ("pick", COUNTRIES), "street": ("pick", STREETS),
    "title": ("pick", TITLES), "model": ("pick", MODELS), "serial": ("code", "SN"), "sku": ("code", "A"),
    "id": ("code", "ID"),
    "age": ("int", 18, 90), "qty": ("int", 1, 20), "pages": ("int", 40, 900), "year": ("int", 1950, 2024),
    "battery": ("int", 0, 100), "seats": ("int", 10, 500), "floor": ("int", 0, 30), "score": ("int", 0, 100),
    "price": ("num", 1, 500, 2), "total": ("num", 5, 900, 2), "rating": ("num", 0, 5, 1), "lat": ("num", -90, 90, 2),
    "lon": ("num", -180, 180, 2), "temp": ("num", -20, 45, 1), "weight": ("num", 0, 60, 1),
    "active": ("bool",), "in_stock": ("bool",), "paid": ("bool",), "online": ("bool",), "verified": ("bool",),
    "status": ("enum", ["new", "paid", "sent", "done"]), "priority": ("enum", ["low", "medium", "high"]),
    "os": ("enum", ["linux", "android", "ios"]), "genre": ("enum", ["novel", "poetry", "history", "sci-fi"]),
    "role": ("enum", ["admin", "user", "guest"]), "kind": ("enum", ["talk", "meetup", "workshop", "concert"]),
    "email": ("email",), "birth_date": ("date",), "order_date": ("date",), "start_date": ("date",),
    "last_seen": ("date",), "published": ("date",),
    "tags": ("list", ("pick", WORDS)), "skills": ("list", ("pick", SKILLS)), "scores": ("list", ("int", 0, 100)),
    "authors": ("list", ("person",)),
    "address": ("obj", ["street", "city", "country"]), "location": ("obj", ["lat", "lon", "city"]),
    "customer": ("obj", ["name", "email", "address"]), "owner": ("obj", ["name", "email", "role"]),
    "venue": ("obj", ["city", "floor", "seats"]), "publisher": ("obj", ["name", "city", "year"]),
    "items": ("objlist", ["sku", "qty", "price"]), "attendees": ("objlist", ["name", "email", "age"]),
    "chapters": ("objlist", ["title", "pages"]), "readings": ("objlist", ["temp", "last_seen"]),
}
ENTITIES: dict[str, list[str]] = {
    "person": ["name", "age", "email", "birth_date", "active", "city", "skills", "address", "role", "tags"],
    "order": ["id", "status", "total", "paid", "order_date", "customer", "items", "priority", "tags"],
    "device": ["serial", "model", "os", "battery", "online", "last_seen", "location", "owner", "readings"],
    "event": ["title", "kind", "start_date", "seats", "price", "venue", "attendees", "tags", "verified"],
    "book": ["title", "authors", "year", "pages", "genre", "rating", "in_stock", "publisher", "chapters"],
}
NEEDS_DEPTH = {"list": 1, "obj": 1, "objlist": 2}


class _Draw:
    """One generated property: its schema, its value (or absent), and its facts."""

    __slots__ = ("name", "schema", "value", "required", "present", "facts")

    def __init__(self, name: str, schema: dict, value: Any, required: bool, present: bool, facts: list[str]):
        self.name, self.schema, self.value, self.facts = name, schema, value, facts
        self.required, self.present = required, present or required


def _fact_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


class _Generator:
    def __init__(self, options: JsonSchemaOptions, rng: random.Random):
        self.options, self.rng = options, rng

    def scalar(self, kind: tuple) -> tuple[dict, Any]:
        rng, tag = self.rng, kind[0]
        if tag == "person":
            return {"type": "string"}, f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if tag == "pick":
            return {"type": "string"}, rng.choice(kind[1])
        if tag == "code":
            return {"type": "string"}, f"{kind[1]}{rng.randint(100, 9999)}"
        if tag == "int":
            schema = {"type": "integer"}
            if rng.random() < 0.5:
                schema.update(minimum=kind[1], maximum=kind[2])
            return schema, rng.randint(kind[1], kind[2])
        if tag == "num":
            schema = {"type": "number"}
            if rng.random() < 0.5:
                schema.update(minimum=kind[1], maximum=kind[2])
            return schema, round(rng.uniform(kind[1], kind[2]), kind[3])
        if tag == "bool":
            return {"type": "boolean"}, rng.random() < 0.5
        if tag == "enum":
            return {"enum": list(kind[1])}, rng.choice(kind[1])
        if tag == "date":
            day = date(1990, 1, 1) + timedelta(days=rng.randint(0, 35 * 365))
            return ({"type": "string", "format": "date"} if self.options.formats else {"type": "string"}), \
                day.isoformat()
        if tag == "email":
            first, last = rng.choice(FIRST).lower(), rng.choice(LAST).lower()
            user = f"{first}.{last}" if rng.random() < 0.5 else f"{first}{rng.randint(1, 99)}"
            return ({"type": "string", "format": "email"} if self.options.formats else {"type": "string"}), \
                f"{user}@{rng.choice(DOMAINS)}"
        raise AssertionError(kind)

    def obj(self, names: list[str], depth: int, count: int, path: str) -> tuple[dict, dict, list[str], list[_Draw]]:
        """An object schema over `count` of `names` (random order), a value, its facts, and the draws."""
        usable = [n for n in names if NEEDS_DEPTH.get(PROPERTIES[n][0], 0) <= depth]
        chosen = self.rng.sample(usable, min(count, len(usable)))
        draws = [self.prop(name, depth, path) for name in chosen]
        return (*self.assemble(draws), draws)

    def assemble(self, draws: list[_Draw]) -> tuple[dict, dict, list[str]]:
        if draws and not any(d.present for d in draws):  # an object the facts say nothing about is ambiguous
            draws[0].present = True
        schema: dict[str, Any] = {"type": "object", "properties": {d.name: d.schema for d in draws}}
        required = [d.name for d in draws if d.required]
        if required:
            schema["required"] = required
        value = {d.name: d.value for d in draws if d.present}
        facts = [f for d in draws if d.present for f in d.facts]
        return schema, value, facts

    def prop(self, name: str, depth: int, path: str) -> _Draw:
        rng, kind = self.rng, PROPERTIES[name]
        label = f"{path}{name}"
        tag = kind[0]
        if tag == "list":
            item_schema, _ = self.scalar(kind[1])
            schema: dict[str, Any] = {"type": "array", "items": item_schema}
            low = 0
            if rng.random() < 0.3:
                schema["minItems"] = low = 1
            length = 0 if low == 0 and rng.random() < 0.1 else rng.randint(1, 3)
            value: Any = []
            for _ in range(length * 4):
                if len(value) == length:
                    break
                _, item = self.scalar(kind[1])
                if item not in value:
                    value.append(item)
            facts = [f"{label} is an empty list" if not value else
                     f"{label} {'is' if len(value) == 1 else 'are'} {', '.join(_fact_value(v) for v in value)}"]
        elif tag == "obj":
            schema, value, facts, _ = self.obj(kind[1], depth - 1, rng.randint(1, min(3, len(kind[1]))),
                                               f"{label}.")
        elif tag == "objlist":
            names = [n for n in kind[1] if NEEDS_DEPTH.get(PROPERTIES[n][0], 0) <= depth - 2]
            chosen = rng.sample(names, rng.randint(1, min(3, len(names))))
            required = {n for n in chosen if rng.random() < 0.6}
            value, facts, item_schema = [], [], None
            for index in range(rng.randint(1, 2)):
                draws = [self.prop(n, depth - 2, f"{label}[{index}].") for n in chosen]
                for d in draws:
                    d.required = d.name in required
                    d.present = d.present or d.required
                schema_i, item, item_facts = self.assemble(draws)
                item_schema = item_schema or schema_i
                value.append(item)
                facts.extend(item_facts)
            schema = {"type": "array", "items": item_schema}
        else:
            schema, value = self.scalar(kind)
            facts = [f"{label} is {_fact_value(value)}"]
        required = rng.random() < 0.6
        return _Draw(name, schema, value, required, required or rng.random() < 0.5, facts)


# ---------------------------------------------------------------------------------------------------- task
def _column(row: dict[str, Any], columns: dict[str, str], field: str) -> Any:
    mapped = columns.get(field)
    if mapped is not None:
        if mapped not in row:
            raise RowError(f"missing column '{mapped}' (mapped to {field}); columns: {', '.join(map(str, row))}")
        return row[mapped]
    for name in FIELDS[field]:
        if row.get(name) not in (None, ""):
            return row[name]
    return None


def _json_field(value: Any, what: str) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return _DECODER.decode(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
        except (ValueError, RecursionError) as exc:
            raise RowError(f"{what} is not valid JSON ({_short(str(exc) or type(exc).__name__, 80)})") from None
    return value


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):  # chat messages: [{"role": ..., "content": ...}, ...]
        parts = [m.get("content") for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        text = "\n".join(p for p in parts if p)
        return text or None
    return None


@register_task
class JsonSchemaTask(Task):
    name = "json"
    Options = JsonSchemaOptions
    description = "Write a JSON instance that follows the given JSON Schema (and states the given facts)."
    column_fields = tuple(FIELDS)

    def default_size(self, split: str) -> int:
        return 5000 if split == "train" else 100

    # ------------------------------------------------------------------------------------------------- data
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        return [self._draw_example(rng) for _ in range(size)]

    def _draw_example(self, rng: random.Random) -> dict[str, Any]:
        options = self.options
        generator = _Generator(options, rng)
        budget = options.max_prompt_chars
        for _ in range(GENERATE_TRIES):
            entity = rng.choice(sorted(ENTITIES))
            names = [n for n in ENTITIES[entity] if NEEDS_DEPTH.get(PROPERTIES[n][0], 0) <= options.max_depth]
            count = rng.randint(options.min_properties, options.max_properties)
            chosen = rng.sample(names, min(count, len(names)))
            draws = [generator.prop(n, options.max_depth, "") for n in chosen]
            for keep in range(len(draws), min(options.min_properties, len(draws)) - 1, -1):
                schema, value, facts = generator.assemble(draws[:keep])
                if options.shuffle_facts:
                    facts = facts[:]
                    rng.shuffle(facts)
                example = {"schema_json": dumps_compact(schema), "reference_json": dumps_compact(value),
                           "facts": "; ".join(facts), "prompt_text": None}
                if budget is None or len(self.prompt(example)) <= budget:
                    return example
        raise UserError(f"task.options.max_prompt_chars: could not fit a generated prompt into {budget} characters "
                        f"in {GENERATE_TRIES} tries; raise it or lower min_properties/max_depth")

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        unknown = [k for k in columns if k not in FIELDS]
        if unknown:
            raise RowError(f"columns: unknown field '{unknown[0]}'; the json task reads {', '.join(FIELDS)}")
        raw = _column(row, columns, "schema")
        if raw is None:
            raise RowError(f"no schema column (looked for {', '.join(SCHEMA_COLUMNS)}); map one with "
                           f"columns: {{schema: NAME}}")
        schema = _json_field(raw, "schema")
        if not isinstance(schema, dict):
            raise RowError(f"schema must be a JSON object, got {type(schema).__name__}")
        schema_json = dumps_compact(schema)
        validator, problem = _validator(schema_json)
        if validator is None:
            raise RowError(problem)
        raw_reference = _column(row, columns, "reference")
        reference_json = None
        if raw_reference is not None and raw_reference != "":
            reference = _json_field(raw_reference, "reference")
            try:
                with pattern_budget():
                    errors = list(islice(validator.iter_errors(reference), 1))
            except PatternTimeout as exc:
                raise RowError(f"the schema's {exc}") from None
            except Exception as exc:  # unresolvable $ref, deep recursion
                raise RowError(f"the schema cannot be applied to the reference ({type(exc).__name__}: "
                               f"{_short(str(exc), 100)})") from None
            if errors:
                error = errors[0]
                raise RowError(f"reference does not match the schema: {_where(_pointer(error.absolute_path))}: "
                               f"{_short(error.message)}")
            reference_json = dumps_compact(order_like_schema(reference, schema))
        facts = _column(row, columns, "facts")
        return {"schema_json": schema_json, "reference_json": reference_json,
                "facts": facts.strip() if isinstance(facts, str) else "",
                "prompt_text": _prompt_text(_column(row, columns, "prompt"))}

    # ----------------------------------------------------------------------------------------------- format
    def schema_text(self, example: dict[str, Any]) -> str:
        if self.options.compact_schema:
            return example["schema_json"]
        return json.dumps(json.loads(example["schema_json"]), ensure_ascii=False)

    def prompt(self, example: dict[str, Any]) -> str:
        facts = example.get("facts") or ""
        if not facts and example.get("prompt_text"):
            return example["prompt_text"]
        text = f"{INSTRUCTION}\nSchema: {self.schema_text(example)}"
        return f"{text}\nFacts: {facts}" if facts else text

    def target(self, example: dict[str, Any]) -> str:
        """The reference as compact JSON, keys in schema order; "" for a row without one (evaluation only)."""
        if example.get("reference_json") is None:
            return ""
        return dumps_compact(order_like_schema(reference_of(example), schema_of(example)))

    def key(self, example: dict[str, Any]) -> str:
        schema = json.dumps(json.loads(example["schema_json"]), sort_keys=True, separators=(",", ":"),
                            ensure_ascii=False)
        return f"{schema}\n{example.get('facts') or ''}"

    # ---------------------------------------------------------------------------------------------- judging
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            text = output_text if isinstance(output_text, str) else ("" if output_text is None else str(output_text))
            return self._judge(example, text)
        except RecursionError:
            return Verdict(False, False, 0.0, "nested too deeply to judge", {})
        except Exception as exc:  # the validator never raises, whatever it is given
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})", {})

    def _judge(self, example: dict[str, Any], text: str) -> Verdict:
        value, problem, offset = extract_json(text)
        if problem is not None:
            return Verdict(False, False, 0.0, f"not valid JSON: {problem}", {"error_offset": offset})
        details: dict[str, Any] = {"json_offset": offset}
        nodes, deepest = _measure(value, MAX_NODES, MAX_DEPTH)
        if nodes > MAX_NODES or deepest > MAX_DEPTH:
            details["too_large"] = True
            what = f"more than {MAX_NODES} values" if nodes > MAX_NODES else f"nesting deeper than {MAX_DEPTH}"
            return Verdict(True, False, 0.0, f"JSON too large to check ({what})", details)

        validator, schema_problem = _validator(example["schema_json"])
        errors: list = []
        if validator is not None:
            try:
                with pattern_budget():
                    errors = list(islice(validator.iter_errors(value), MAX_ERRORS))
            except PatternTimeout as exc:
                schema_problem = f"the schema's {exc}"
            except RecursionError:
                schema_problem = "the schema recurses too deeply"
            except Exception as exc:  # unresolvable $ref, a regex Python cannot run, ...
                schema_problem = f"the schema cannot be applied ({type(exc).__name__}: {_short(str(exc), 80)})"
        schema_ok = validator is not None and schema_problem is None and not errors
        details["schema_valid"] = schema_ok
        paths = [_pointer(e.absolute_path) for e in errors]
        details["errors"] = paths[:SHOWN_PATHS]
        details["error_count"] = len(errors)
        details["error_count_capped"] = len(errors) >= MAX_ERRORS

        reason = None
        if schema_problem is not None:
            reason = schema_problem
        elif errors:
            error = max(errors, key=lambda e: len(e.absolute_path))  # the most precise place (first if tied)
            reason = f"{_where(_pointer(error.absolute_path))}: {_short(error.message)}"

        reference_json = example.get("reference_json")
        if reference_json is None or not self.options.match_reference:
            score = 1.0 if schema_ok else 0.0
            return Verdict(True, schema_ok, score, reason or "follows the schema", details)

        expected = _reference_leaves(reference_json)
        got = _leaves(value)
        matched = sum(1 for p, v in expected.items() if p in got and _same(v, got[p]))
        total = len(expected.keys() | got.keys())
        details.update(leaves_matched=matched, leaves_expected=len(expected), leaves_total=total)
        equal = matched == total
        score = matched / total if total else 0.0
        if reason is None and not equal:
            missing = next((p for p in expected if p not in got), None)
            wrong = next((p for p in expected if p in got and not _same(expected[p], got[p])), None)
            extra = next((p for p in got if p not in expected), None)
            if wrong is not None:
                reason = (f"{_where(wrong)}: expected {_short(dumps_compact(expected[wrong]), 60)}, "
                          f"got {_short(dumps_compact(got[wrong]), 60)}")
            elif missing is not None:
                reason = f"{_where(missing)}: missing (expected {_short(dumps_compact(expected[missing]), 60)})"
            else:
                reason = f"{_where(extra)}: not in the reference"
            details["first_mismatch"] = wrong if wrong is not None else missing if missing is not None else extra
        return Verdict(True, schema_ok and equal, score, reason or "follows the schema and matches the reference",
                       details)

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """The offset of the first JSON syntax error in a full-length draft of the target (the last character
        when the draft ends before the JSON does); [] when it parses."""
        try:
            text = partial_text if isinstance(partial_text, str) else ""
            if not text:
                return []
            text = text[:MAX_CHARS]
            try:
                _DECODER.decode(text)
                return []
            except json.JSONDecodeError as exc:
                return [min(exc.pos, len(text) - 1)]
            except ValueError:  # NaN/Infinity or an over-long integer: no precise offset
                return []
        except Exception:  # a draft can be anything; a hook must never break sampling
            return []
