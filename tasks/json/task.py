"""The json task: the prompt states a schema (and facts), the target is the reference as compact JSON in schema
key order; judging, generation and row reading live in their own modules."""

from __future__ import annotations

import json
import random
from typing import Any

from dgemma_ft.tasks.base import Task, Verdict, register_task
from dgemma_ft.tasks.json.extract import draft_violations
from dgemma_ft.tasks.json.generate import draw_example
from dgemma_ft.tasks.json.json_text import dumps_compact, reference_of, schema_of
from dgemma_ft.tasks.json.judge import judge
from dgemma_ft.tasks.json.key_order import order_like_schema
from dgemma_ft.tasks.json.options import JsonSchemaOptions
from dgemma_ft.tasks.json.rows import FIELDS, example_from_row

INSTRUCTION = "Write JSON that follows this schema."


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
        return [draw_example(self.options, rng, self.prompt) for _ in range(size)]

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        return example_from_row(row, columns)

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
            return judge(example, text, self.options.match_reference)
        except RecursionError:
            return Verdict(False, False, 0.0, "nested too deeply to judge", {})
        except Exception as exc:  # the validator never raises, whatever it is given
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})", {})

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """The offset of the first JSON syntax error in a full-length draft of the target (the last character
        when the draft ends before the JSON does); [] when it parses."""
        try:
            return draft_violations(partial_text) if isinstance(partial_text, str) else []
        except Exception:  # a draft can be anything; a hook must never break sampling
            return []
