"""Exact LaTeX arithmetic: the value of a number or of a small LaTeX expression (``\\frac{36}{2}``,
``3 \\cdot 6``, ``\\sqrt{324}``) as a fraction, so that a rational reference answer is compared exactly and in
microseconds (math-verify takes milliseconds to seconds on each new input: see benchmarks/math_validation.py)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from dgemma_ft.tasks.math.answers import MAX_CANDIDATE_CHARS, MAX_NUMBER_DIGITS, plain_number


class _Irrational:
    """The value of a well-formed expression that is not a rational number (e.g. \\sqrt{2})."""


IRRATIONAL = _Irrational()
_LATEX_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\frac|\\sqrt|[-+*/(){}]")
_LATEX_SUBSTITUTIONS = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                        ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), (" ", ""))


class _NotArithmetic(Exception):
    pass


def exact_value(text: str) -> Fraction | _Irrational | None:
    """The exact value of a number or a small LaTeX arithmetic expression (numbers, + - * /, \\cdot, \\times,
    \\div, parentheses, \\frac{a}{b}, \\sqrt{x}); IRRATIONAL for a well-formed expression whose value is not
    rational; None for anything else (including division by zero)."""
    value = plain_number(text)
    if value is not None or not text or len(text) > MAX_CANDIDATE_CHARS:
        return value
    for old, new in _LATEX_SUBSTITUTIONS:
        text = text.replace(old, new)
    tokens = _LATEX_TOKEN_RE.findall(text)
    if "".join(tokens) != text or any(len(t) > MAX_NUMBER_DIGITS for t in tokens):
        return None
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal position
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise _NotArithmetic
        position += 1
        return token

    def expression(depth: int):
        value = term(depth)
        while peek() in ("+", "-"):
            op = take()
            right = term(depth)
            value = IRRATIONAL if IRRATIONAL in (value, right) else (value + right if op == "+" else value - right)
        return value

    def term(depth: int):
        value = factor(depth)
        while peek() in ("*", "/", "(", "\\sqrt"):  # not before \frac: 2\frac{1}{2} may mean 2 1/2
            op = take() if peek() in ("*", "/") else "*"  # implicit product: 2\sqrt{9}, 3(4)
            right = factor(depth)
            if IRRATIONAL in (value, right):
                value = IRRATIONAL
            elif op == "*":
                value = value * right
            elif right == 0:
                raise ZeroDivisionError
            else:
                value = value / right
        return value

    def factor(depth: int):
        if depth > 20:
            raise _NotArithmetic
        token = take()
        if token in ("-", "+"):
            inner = factor(depth + 1)
            return inner if token == "+" or inner is IRRATIONAL else -inner
        if token in ("(", "{"):
            inner = expression(depth + 1)
            take(")" if token == "(" else "}")
            return inner
        if token == "\\frac" and peek() is not None and re.fullmatch(r"\d\d", peek()):
            digits = take()  # \frac12 is 1/2
            if digits[1] == "0":
                raise ZeroDivisionError
            return Fraction(int(digits[0]), int(digits[1]))
        if token == "\\frac":
            take("{")
            top = expression(depth + 1)
            take("}")
            take("{")
            bottom = expression(depth + 1)
            take("}")
            if IRRATIONAL in (top, bottom):
                return IRRATIONAL
            if bottom == 0:
                raise ZeroDivisionError
            return top / bottom
        if token == "\\sqrt":
            take("{")
            inner = expression(depth + 1)
            take("}")
            if inner is IRRATIONAL or inner < 0:
                return IRRATIONAL
            top, bottom = math.isqrt(inner.numerator), math.isqrt(inner.denominator)
            if top * top == inner.numerator and bottom * bottom == inner.denominator:
                return Fraction(top, bottom)
            return IRRATIONAL
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise _NotArithmetic

    try:
        value = expression(0)
    except (_NotArithmetic, ZeroDivisionError, ValueError, RecursionError):
        return None
    return value if position == len(tokens) else None
