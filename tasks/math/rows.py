"""Reading source rows into math examples: GSM8K-style word problems (the final answer from a `final` column,
else the worked solution's ``#### N`` or ``\\boxed{}``) and countdown puzzles (a reference, an expression or a
step trace, that is checked against the rule; else one found by search)."""

from __future__ import annotations

import json
import re
from typing import Any

from dgemma_ft.tasks.base import RowError, column
from dgemma_ft.tasks.math.answers import clean, final_from_answer, hash_answer
from dgemma_ft.tasks.math.countdown import Rejected, check_answer, read_answer, shown_answer
from dgemma_ft.tasks.math.countdown_puzzles import countdown_example, solve_countdown

QUESTION_COLUMNS = ("question", "problem", "Question")
ANSWER_COLUMNS = ("answer", "solution", "Answer")
FINAL_COLUMNS = ("final", "final_answer")
NUMBERS_COLUMNS = ("numbers", "nums")
TARGET_COLUMNS = ("target_value", "target")
EXPRESSION_COLUMNS = ("final", "expression")
COLUMN_FIELDS = ("question", "answer", "final", "numbers", "target_value")

MAX_SOLVE_NUMBERS = 6  # countdown rows without a solution are solved by search up to this many numbers


def is_countdown_row(row: dict[str, Any], columns: dict[str, str]) -> bool:
    """A row says it is countdown (`kind`), or it has numbers and no question (nor a mapped question column)."""
    if row.get("kind") == "countdown":
        return True
    if "question" in columns or column(row, columns, "question", QUESTION_COLUMNS)[1] is not None:
        return False
    return column(row, columns, "numbers", NUMBERS_COLUMNS)[1] is not None


def word_from_row(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    question_column, question = column(row, columns, "question", QUESTION_COLUMNS)
    if question is None or (isinstance(question, str) and not question.strip()):
        raise RowError(f"missing column '{question_column}' (the question); map it with "
                       f"columns: {{question: <name>}}")
    if not isinstance(question, str):
        raise RowError(f"column '{question_column}' must be text")
    answer_column, answer = column(row, columns, "answer", ANSWER_COLUMNS)
    _, final = column(row, columns, "final", FINAL_COLUMNS)
    if answer is not None and not isinstance(answer, str):
        raise RowError(f"column '{answer_column}' must be text")
    if final is not None:
        final = clean(str(final))
        if not any(c.isdigit() for c in final):
            final = None
    if final is None:
        if answer is None:
            raise RowError(f"missing column '{answer_column}' (the worked solution ending '#### N')")
        final = final_from_answer(answer)
        if final is None:
            raise RowError(f"no final number in column '{answer_column}': expected a last line "
                           f"'#### N' (or \\boxed{{N}})")
    if answer is None or not answer.strip():
        answer = f"#### {final}"
    elif hash_answer(answer) is None:
        answer = f"{answer.rstrip()}\n#### {final}"
    return {"kind": "word", "question": question.strip(), "answer": answer.strip(), "final": final,
            "numbers": None, "target_value": None}


def _whole_number(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise RowError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        return int(value)
    raise RowError(f"{what} must be a whole number, got {str(value)[:40]!r}")


def _countdown_numbers(row: dict[str, Any], columns: dict[str, str]) -> list[int]:
    numbers_column, numbers = column(row, columns, "numbers", NUMBERS_COLUMNS)
    if numbers is None:
        raise RowError(f"missing column '{numbers_column}' (the countdown numbers)")
    if isinstance(numbers, str):
        text = numbers
        try:
            numbers = json.loads(text)
        except ValueError:
            numbers = re.findall(r"-?\d+", text)
    if not isinstance(numbers, (list, tuple)) or not 2 <= len(numbers) <= 8:
        raise RowError(f"column '{numbers_column}' must hold 2 to 8 whole numbers")
    numbers = [_whole_number(n, f"column '{numbers_column}'") for n in numbers]
    if any(abs(n) > 1_000_000 for n in numbers):
        raise RowError(f"column '{numbers_column}': numbers must be at most 1,000,000 in size")
    return numbers


def countdown_from_row(row: dict[str, Any], columns: dict[str, str], exactly_once: bool = True) -> dict[str, Any]:
    """A countdown example; its reference (an expression or a step trace) must keep the rule, which with
    `exactly_once` means using every number once."""
    numbers = _countdown_numbers(row, columns)
    target_column, target = column(row, columns, "target_value", TARGET_COLUMNS)
    if target is None:
        raise RowError(f"missing column '{target_column}' (the countdown target)")
    target = _whole_number(target, f"column '{target_column}'")
    reference_column, reference = column(row, columns, "final", EXPRESSION_COLUMNS)
    if reference is not None:
        answer = read_answer(str(reference).strip())
        try:
            ok = check_answer(answer, numbers, exactly_once) == target
        except Rejected as exc:
            raise RowError(f"column '{reference_column}': {exc}") from None
        if not ok:
            raise RowError(f"column '{reference_column}': '{shown_answer(answer)[:60]}' does not make {target}")
        reference = shown_answer(answer)
    else:
        if len(numbers) > MAX_SOLVE_NUMBERS:
            raise RowError(f"no solution column and more than {MAX_SOLVE_NUMBERS} numbers to search; "
                           f"add a column '{EXPRESSION_COLUMNS[0]}' with an expression")
        reference = solve_countdown(numbers, target, exactly_once)
        if reference is None:
            rule = "each used exactly once" if exactly_once else "each used at most once"
            raise RowError(f"no expression of {numbers} ({rule}) makes {target}")
    return countdown_example(numbers, target, reference, exactly_once)
