"""Checking countdown answers, in either form public sets use:

- an expression (d1): ``(44-15)*3``, read from the answer's last line, parsed with `ast` (never evaluated as
  Python) and computed exactly with fractions;
- a step trace (Dream): ``44-15=29,79-29=50``, steps ``a op b = c`` separated by commas, semicolons or line
  breaks. Each step must compute its result exactly and may only use numbers still available: given ones, or
  results of earlier steps, each consumed once. The last step's result is the answer.

With `exactly_once` (the default, as in d1 and Dream) every given number must be used, and in a trace every
step's result but the last one must be used by a later step; otherwise each number is used at most once."""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import NamedTuple

from dgemma_ft.tasks.base import Verdict

MAX_EXPRESSION_CHARS = 200  # longer expressions are rejected before parsing
MAX_EXPRESSION_NODES = 200
MAX_ANSWER_CHARS = 800      # an answer is read from its last 800 characters

_EXPRESSION_CHARS_RE = re.compile(r"[0-9+\-*/() ]*")
_STEP_RE = re.compile(r"(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)")
_STEP_SEPARATORS_RE = re.compile(r"[,;]")
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_TYPOGRAPHIC = (("\u00d7", "*"), ("\u22c5", "*"), ("\u00b7", "*"), ("\u00f7", "/"), ("\u2212", "-"),
                ("\u2013", "-"), ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"))


class Rejected(Exception):
    """An answer that breaks the rules; the message is the reason."""


class Step(NamedTuple):
    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left}{self.op}{self.right}={self.result}"


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise Rejected("divides by zero")
    return left / right


def _unquoted(line: str) -> str:
    """A line without quoting, a trailing full stop or a label such as 'Answer:'; typographic operators become
    ASCII."""
    for old, new in _TYPOGRAPHIC:
        line = line.replace(old, new)
    line = line.strip("`$ ").rstrip(".").strip()
    if ":" in line:  # "Answer: (4+6)*3"
        line = line.rsplit(":", 1)[1].strip("`$ ")
    return line


def _steps(line: str) -> list[Step] | None:
    """The steps of a line made only of 'a op b = c' steps separated by commas or semicolons, else None."""
    parts = [part.strip() for part in _STEP_SEPARATORS_RE.split(line) if part.strip()]
    found = [_STEP_RE.fullmatch(part) for part in parts]
    if not parts or not all(found):
        return None
    return [Step(int(m[1]), m[2], int(m[3]), int(m[4])) for m in found]


def read_answer(text: str) -> str | list[Step]:
    """What a countdown answer offers: the step trace formed by its trailing lines that hold only steps, else
    the expression on its last non-empty line (without '= target')."""
    lines = [_unquoted(line) for line in text[-MAX_ANSWER_CHARS:].splitlines() if line.strip()]
    trace: list[Step] = []
    for line in reversed(lines):
        steps = _steps(line)
        if steps is None:
            break
        trace[:0] = steps
    if trace or not lines:
        return trace or ""
    line = lines[-1]
    if "=" in line:
        parts = [part.strip() for part in line.split("=") if part.strip()]
        with_ops = [part for part in parts if any(op in part for op in "+-*/")]
        line = (with_ops or parts or [""])[0]
    return line


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand)
    return _apply(_AST_OPS[type(node.op)], _evaluate(node.left), _evaluate(node.right))


def _shown(numbers: Counter[int]) -> str:
    return ", ".join(str(n) for n in sorted(numbers.elements()))


def check_expression(expression: str, numbers: list[int], exactly_once: bool = True) -> Fraction:
    """The exact value of a countdown `expression` over `numbers`; raises `Rejected` with the reason when it
    is not a well-formed expression of the given numbers, each used as often as given (at most as often,
    without `exactly_once`)."""
    if not expression:
        raise Rejected("no expression found")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise Rejected(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _EXPRESSION_CHARS_RE.fullmatch(expression):
        bad = next(c for c in expression if not _EXPRESSION_CHARS_RE.fullmatch(c))
        raise Rejected(f"character {bad!r} is not a digit, + - * / or a parenthesis")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Rejected("not a well-formed expression") from None
    used: Counter[int] = Counter()
    count = 0
    for node in ast.walk(tree):
        count += 1
        if count > MAX_EXPRESSION_NODES:
            raise Rejected(f"expression has more than {MAX_EXPRESSION_NODES} parts")
        if isinstance(node, (ast.Expression, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub)):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used[node.value] += 1
            continue
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise Rejected(f"{what} is not allowed (only numbers, + - * /, unary minus, parentheses)")
    available = Counter(numbers)
    for number, times in sorted(used.items()):
        if number not in available:
            raise Rejected(f"uses {number}, which is not one of the numbers")
        if times > available[number]:
            raise Rejected(f"uses {number} {times} times but it is given {available[number]} time(s)")
    if exactly_once and available - used:
        raise Rejected(f"leaves out {_shown(available - used)}: each number must be used exactly once")
    try:
        return _evaluate(tree.body)
    except RecursionError:
        raise Rejected("expression nested too deeply") from None


def check_trace(steps: list[Step], numbers: list[int], exactly_once: bool = True) -> Fraction:
    """The last result of a step trace over `numbers`; raises `Rejected` with the reason when a step computes
    wrongly or uses a number that is not available (never given, or already used)."""
    if not steps:
        raise Rejected("no steps found")
    available, produced = Counter(numbers), Counter()
    for index, step in enumerate(steps, 1):
        where = f"step {index} ({step})"
        for operand in (step.left, step.right):
            if available[operand] == 0:
                ever = operand in numbers or produced[operand]
                raise Rejected(f"{where}: {operand} is {'already used' if ever else 'not one of the numbers'}"
                               f"{'' if ever else ' nor an earlier result'}")
            available[operand] -= 1
        try:
            value = _apply(step.op, Fraction(step.left), Fraction(step.right))
        except Rejected as exc:
            raise Rejected(f"{where}: {exc}") from None
        if value != step.result:
            shown = str(value) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
            raise Rejected(f"{where}: {step.left}{step.op}{step.right} is {shown}, not {step.result}")
        available[step.result] += 1
        produced[step.result] += 1
    left = +available - Counter((steps[-1].result,))
    if exactly_once and left:
        raise Rejected(f"leaves {_shown(left)} unused: each number must be used exactly once, and each step's "
                       f"result by a later step")
    return Fraction(steps[-1].result)


def check_answer(answer: str | list[Step], numbers: list[int], exactly_once: bool = True) -> Fraction:
    """The value of what `read_answer` found: a trace's last result or an expression's value."""
    if isinstance(answer, list):
        return check_trace(answer, numbers, exactly_once)
    return check_expression(answer, numbers, exactly_once)


def shown_answer(answer: str | list[Step]) -> str:
    return ",".join(map(str, answer)) if isinstance(answer, list) else answer


def judge_countdown(numbers: list[int], target: int, output_text: str, exactly_once: bool = True) -> Verdict:
    """Correct: an expression or step trace over the given numbers, keeping the rules, that makes the target
    (score 1). Kept the rules but missed the target: score 0.5. Anything else: invalid, score 0."""
    answer = read_answer(output_text)
    form, shown = ("trace" if isinstance(answer, list) else "expression"), shown_answer(answer)
    try:
        value = check_answer(answer, numbers, exactly_once)
    except Rejected as exc:
        return Verdict(False, False, 0.0, str(exc), {form: shown[:MAX_EXPRESSION_CHARS]})
    made = str(value) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    details = {form: shown, "value": made, "target": target}
    if value == target:
        return Verdict(True, True, 1.0, f"{shown} = {target}" if form == "expression" else
                       f"{shown} reaches {target}", details)
    return Verdict(True, False, 0.5, f"{shown} = {made}, not {target}" if form == "expression" else
                   f"{shown} reaches {made}, not {target}", details)
