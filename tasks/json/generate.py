"""Generated examples: a schema drawn from the vocabulary (nested objects, arrays of scalars and of objects,
enums, bounds, formats, required and optional properties), a reference instance that validates, and facts text
stating every value in it; names and string values come from the builtin vocabulary or an invented half
(`lexicon`, option `vocabulary`). Same seed, same examples."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from dgemma_ft.errors import UserError
from dgemma_ft.tasks.json.json_text import dumps_compact
from dgemma_ft.tasks.json.lexicon import BuiltinLexicon, lexicon
from dgemma_ft.tasks.json.options import JsonSchemaOptions
from dgemma_ft.tasks.json.vocabulary import ENTITIES, NEEDS_DEPTH, PROPERTIES

GENERATE_TRIES = 30  # draws for one example before the prompt budget is declared out of reach


def _within_depth(names: list[str], depth: int) -> list[str]:
    """The properties whose kind fits in `depth` container levels."""
    return [n for n in names if NEEDS_DEPTH.get(PROPERTIES[n][0], 0) <= depth]


def draw_example(options: JsonSchemaOptions, rng: random.Random, prompt: Callable[[dict], str]) -> dict[str, Any]:
    """One example whose `prompt(example)` fits `options.max_prompt_chars`: trailing properties are dropped
    (down to `min_properties`) or the schema redrawn, at most GENERATE_TRIES times."""
    generator = _Generator(options, rng)
    budget = options.max_prompt_chars
    for _ in range(GENERATE_TRIES):
        generator.lex = lexicon(options.vocabulary, rng)
        entity = rng.choice(sorted(ENTITIES))
        names = _within_depth(ENTITIES[entity], options.max_depth)
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
            if budget is None or len(prompt(example)) <= budget:
                return example
    raise UserError(f"task.options.max_prompt_chars: could not fit a generated prompt into {budget} characters "
                    f"in {GENERATE_TRIES} tries; raise it or lower min_properties/max_depth")


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
        self.lex: BuiltinLexicon = lexicon(options.vocabulary, rng)

    def scalar(self, kind: tuple) -> tuple[dict, Any]:
        rng, lex, tag = self.rng, self.lex, kind[0]
        if tag == "person":
            return {"type": "string"}, lex.person()
        if tag == "pick":
            return {"type": "string"}, lex.pick(kind[1])
        if tag == "code":
            return {"type": "string"}, f"{lex.prefix(kind[1])}{rng.randint(100, 9999)}"
        if tag in ("int", "num"):
            schema = {"type": "integer" if tag == "int" else "number"}
            if rng.random() < 0.5:
                schema.update(minimum=kind[1], maximum=kind[2])
            if tag == "int":
                return schema, rng.randint(kind[1], kind[2])
            return schema, round(rng.uniform(kind[1], kind[2]), kind[3])
        if tag == "bool":
            return {"type": "boolean"}, rng.random() < 0.5
        if tag == "enum":
            options = lex.options(kind[1])
            return {"enum": options}, rng.choice(options)
        if tag == "date":
            day = date(1990, 1, 1) + timedelta(days=rng.randint(0, 35 * 365))
            return self._string("date"), day.isoformat()
        if tag == "email":
            return self._string("email"), lex.email()
        raise AssertionError(kind)

    def _string(self, format_name: str) -> dict:
        return {"type": "string", "format": format_name} if self.options.formats else {"type": "string"}

    def obj(self, names: list[str], depth: int, count: int, path: str) -> tuple[dict, dict, list[str]]:
        """An object schema over `count` of `names` (random order), a value and its facts."""
        usable = _within_depth(names, depth)
        chosen = self.rng.sample(usable, min(count, len(usable)))
        return self.assemble([self.prop(name, depth, path) for name in chosen])

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
        rng, kind, shown = self.rng, PROPERTIES[name], self.lex.name(name)
        label = f"{path}{shown}"
        tag = kind[0]
        if tag == "list":
            schema, value, facts = self.scalar_list(kind[1], label)
        elif tag == "obj":
            schema, value, facts = self.obj(kind[1], depth - 1, rng.randint(1, min(3, len(kind[1]))), f"{label}.")
        elif tag == "objlist":
            schema, value, facts = self.object_list(kind[1], depth, label)
        else:
            schema, value = self.scalar(kind)
            facts = [f"{label} is {_fact_value(value)}"]
        required = rng.random() < 0.6
        return _Draw(shown, schema, value, required, required or rng.random() < 0.5, facts)

    def scalar_list(self, item_kind: tuple, label: str) -> tuple[dict, list, list[str]]:
        """An array of distinct scalars (0-3 of them; `minItems: 1` now and then)."""
        rng = self.rng
        item_schema, _ = self.scalar(item_kind)
        schema: dict[str, Any] = {"type": "array", "items": item_schema}
        low = 0
        if rng.random() < 0.3:
            schema["minItems"] = low = 1
        length = 0 if low == 0 and rng.random() < 0.1 else rng.randint(1, 3)
        value: list = []
        for _ in range(length * 4):
            if len(value) == length:
                break
            _, item = self.scalar(item_kind)
            if item not in value:
                value.append(item)
        facts = [f"{label} is an empty list" if not value else
                 f"{label} {'is' if len(value) == 1 else 'are'} {', '.join(_fact_value(v) for v in value)}"]
        return schema, value, facts

    def object_list(self, names: list[str], depth: int, label: str) -> tuple[dict, list, list[str]]:
        """An array of 1-2 objects over the same 1-3 properties (one item schema)."""
        rng = self.rng
        usable = _within_depth(names, depth - 2)
        chosen = rng.sample(usable, rng.randint(1, min(3, len(usable))))
        required = {self.lex.name(n) for n in chosen if rng.random() < 0.6}
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
        return {"type": "array", "items": item_schema}, value, facts
