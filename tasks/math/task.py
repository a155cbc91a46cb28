"""The math task: word problems with a numeric final answer and countdown puzzles behind the `Task` interface.
Each example carries its own `kind` (``word`` or ``countdown``), so one task loads and judges both."""

from __future__ import annotations

import random
from typing import Any

from dgemma_ft.tasks.base import Task, Verdict, register_task
from dgemma_ft.tasks.math.answers import clean, final_from_answer
from dgemma_ft.tasks.math.arithmetic import make_arithmetic
from dgemma_ft.tasks.math.countdown import judge_countdown
from dgemma_ft.tasks.math.countdown_puzzles import countdown_question, make_countdown
from dgemma_ft.tasks.math.options import MathOptions
from dgemma_ft.tasks.math.rows import COLUMN_FIELDS, countdown_from_row, is_countdown_row, word_from_row
from dgemma_ft.tasks.math.word_judge import judge_word

WORD_INSTRUCTION = "End your answer with a line '#### <number>'."
COUNTDOWN_INSTRUCTION = "Answer with the expression only."
TRACE_INSTRUCTION = "Answer with the steps only, as 'a op b = c' separated by commas."
EXPRESSION_CHARS = frozenset("0123456789+-*/() ")  # what a countdown target may hold (see `violations`)
TRACE_CHARS = frozenset("0123456789+-*/= ,;\n")


def _is_countdown(example: dict[str, Any]) -> bool:
    return example.get("kind") == "countdown"


def _is_trace(example: dict[str, Any]) -> bool:
    """Whether a countdown example's reference is a step trace (``44-15=29,79-29=50``), not an expression."""
    return "=" in str(example.get("final") or "")


@register_task
class MathTask(Task):
    """Word problems with a numeric answer (GSM8K style, generated arithmetic) and countdown puzzles."""

    name = "math"
    Options = MathOptions
    description = "math word problems ('#### N' answers, GSM8K style) and countdown puzzles (expressions or traces)"
    column_fields = COLUMN_FIELDS
    options: MathOptions

    @property
    def exactly_once(self) -> bool:
        return self.options.number_use == "exactly_once"

    def default_size(self, split: str) -> int:
        return 20_000 if split == "train" else 500

    # ---- data
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        o = self.options
        if o.family == "countdown":
            return [make_countdown(rng, o.min_numbers, o.max_numbers, o.max_operand, o.max_target, self.exactly_once)
                    for _ in range(size)]
        return [make_arithmetic(rng, o.min_steps, o.max_steps, o.max_operand, o.solution_style) for _ in range(size)]

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        if is_countdown_row(row, columns):
            return countdown_from_row(row, columns, self.exactly_once)
        return word_from_row(row, columns)

    # ---- format
    def prompt(self, example: dict[str, Any]) -> str:
        if _is_countdown(example):
            if self.options.prompt_style == "compact":
                numbers = " ".join(str(n) for n in example["numbers"])
                return f"{numbers} -> {example['target_value']}{' (steps)' if _is_trace(example) else ''}"
            question = countdown_question(example["numbers"], example["target_value"], self.exactly_once)
            return f"{question} {TRACE_INSTRUCTION if _is_trace(example) else COUNTDOWN_INSTRUCTION}"
        if self.options.prompt_style == "compact":
            return example["question"]
        return f"{example['question']}\n{WORD_INSTRUCTION}"

    def target(self, example: dict[str, Any]) -> str:
        if _is_countdown(example):
            return example["final"]
        if self.options.worked_solution and example.get("answer"):
            return example["answer"]
        return f"#### {example['final']}"

    def key(self, example: dict[str, Any]) -> str:
        if _is_countdown(example):
            return f"countdown {sorted(example['numbers'])} -> {example['target_value']}"
        return example["question"]

    # ---- judging
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            if not isinstance(output_text, str):
                output_text = str(output_text)
            if _is_countdown(example):
                numbers, target = example.get("numbers"), example.get("target_value")
                if not numbers or target is None:
                    return Verdict(False, False, 0.0, "the example has no numbers or target")
                return judge_countdown(list(numbers), int(target), output_text, self.exactly_once)
            gold = example.get("final")
            gold = clean(str(gold)) if gold not in (None, "") else final_from_answer(example.get("answer") or "")
            if not gold:
                return Verdict(False, False, 0.0, "the example has no reference answer")
            return judge_word(gold, output_text)
        except Exception as exc:  # the contract: never raise on any string
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})")

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Countdown: offsets of characters that cannot appear in an answer of the reference's form (an
        expression, or a step trace)."""
        if not _is_countdown(example):
            return []
        allowed = TRACE_CHARS if _is_trace(example) else EXPRESSION_CHARS
        return [i for i, char in enumerate(partial_text) if char not in allowed]
