"""Judging word answers: find the final answer (``#### N``, else ``\\boxed{...}``, else the last number) and
compare it with the reference."""

from __future__ import annotations

import re
from fractions import Fraction

from dgemma_ft.tasks.base import Verdict
from dgemma_ft.tasks.math.answers import (MAX_NUMBER_DIGITS, TAIL_CHARS, boxed_content, clean, first_number,
                                          hash_answer, last_number, plain_number)
from dgemma_ft.tasks.math.exact import exact_value
from dgemma_ft.tasks.math.verify import math_verify_equal


def compare_answers(gold: str, answer: str, first: bool = False) -> tuple[bool | None, str]:
    """(equal?, how it was decided); equal is None when `answer` holds no usable number.

    A rational reference (every GSM8K and generated answer) is compared exactly with the answer's value: a
    number, or small LaTeX arithmetic (`exact_value`), else the answer's last number (its first with `first`,
    for '#### 18 apples'). math-verify is asked only when the reference itself is not rational (``\\sqrt{2}``):
    it takes milliseconds to a few hundred on each new input (benchmarks/math_validation.py), too slow for the
    per-call bound, and for a rational reference exact arithmetic decides the same question deterministically."""
    digits = max((len(m) for m in re.findall(r"\d+", answer)), default=0)
    if digits > MAX_NUMBER_DIGITS:
        return False, "too many digits"
    gold_value, answer_value = exact_value(gold), exact_value(answer)
    if isinstance(gold_value, Fraction):
        if answer_value is not None:
            return gold_value == answer_value, "exact"
        number = first_number(answer) if first else last_number(answer)
        value = plain_number(number) if number is not None else None
        if value is not None:
            return gold_value == value, f"exact ({'first' if first else 'last'} number of the answer)"
        return None, "no number"
    judged = math_verify_equal(gold, answer)
    if judged is not None:
        return judged, "math-verify"
    if answer.replace(" ", "") == gold.replace(" ", ""):
        return True, "text"
    number = last_number(answer)
    return (None, "no number") if number is None else (False, "text")


def judge_word(gold: str, output_text: str) -> Verdict:
    """Compare the final answer in `output_text` with `gold`."""
    tail = output_text[-TAIL_CHARS:]
    attempts = (("####", hash_answer(tail)), ("\\boxed", boxed_content(tail)), ("last number", last_number(tail)))
    for method, raw in attempts:
        if raw is None:
            continue
        candidate = clean(raw)
        if not candidate:
            continue
        equal, how = compare_answers(gold, candidate, first=method == "####")
        if equal is None:
            continue
        shown = " ".join(candidate.split())  # a reason is one line, whatever the answer held
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        details = {"extracted": candidate, "method": method, "compare": how, "expected": gold}
        if equal:
            return Verdict(True, True, 1.0, f"final answer {shown} is correct ({method}, {how})", details)
        return Verdict(True, False, 0.0, f"final answer {shown} but expected {gold} ({method}, {how})", details)
    return Verdict(False, False, 0.0, "no final answer found ('#### N', \\boxed{N} or a number)",
                   {"expected": gold})
