"""Math: word problems with a numeric final answer (GSM8K style) and countdown puzzles.

Two kinds of example share the task; each example carries its own `kind`:

- ``word``: a question whose answer is a worked solution ending in ``#### N``. Data: generated multi-step
  integer arithmetic problems (`family: arithmetic`), GSM8K-style rows from files or the Hub. Judged by the
  final answer only: ``#### N``, else ``\\boxed{...}``, else the last number in the text. A rational reference
  answer is compared exactly (the answer may be a number or small LaTeX arithmetic such as ``\\frac{36}{2}``);
  a non-rational one (``\\sqrt{2}``) with math-verify (see `compare_answers`).
- ``countdown``: given numbers and a target, write an expression with + - * / and parentheses that uses each
  number at most once and equals the target. Data: generated (`family: countdown`; the target is built from a
  random expression, so every puzzle is solvable) or rows with numbers and a target. Judged by parsing the
  expression with `ast` (never evaluated as Python) and computing it exactly with fractions.

Example fields: `kind`, `question`, `answer` (worked solution ending ``#### N``; None for countdown), `final`
(the final answer: ``"18"`` for a word problem, the reference expression for countdown), `numbers` and
`target_value` (countdown only; None for word problems).
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, model_validator

from dgemma_ft.tasks.base import RowError, Task, TaskOptions, Verdict, register_task

WORD_INSTRUCTION = "End your answer with a line '#### <number>'."
COUNTDOWN_INSTRUCTION = "Answer with the expression only."

QUESTION_COLUMNS = ("question", "problem", "Question")
ANSWER_COLUMNS = ("answer", "solution", "Answer")
FINAL_COLUMNS = ("final", "final_answer")
NUMBERS_COLUMNS = ("numbers", "nums")
TARGET_COLUMNS = ("target_value", "target")
EXPRESSION_COLUMNS = ("final", "expression")

TAIL_CHARS = 2000         # a word answer is judged on its last 2,000 characters
MAX_CANDIDATE_CHARS = 100  # an extracted final answer is cut to this length
MAX_NUMBER_DIGITS = 60     # longer numbers are never equal to a reference answer (and are not converted)
MV_MAX_CHARS = 40          # the most characters of an answer handed to math-verify, after the guard below
MAX_EXPRESSION_CHARS = 200  # countdown: longer expressions are rejected before parsing
MAX_EXPRESSION_NODES = 200
MAX_SOLVE_NUMBERS = 6      # countdown rows without a solution are solved by search up to this many numbers


# -------------------------------------------------------------------------------------------------- options
class MathOptions(TaskOptions):
    family: Literal["arithmetic", "countdown"] = Field(
        "arithmetic", description="what `generate` makes; rows loaded from files decide their own kind")
    min_steps: int = Field(1, ge=1, le=8, description="arithmetic: fewest operations in a problem")
    max_steps: int = Field(3, ge=1, le=8, description="arithmetic: most operations in a problem")
    max_operand: int = Field(20, ge=2, le=10_000, description="largest number a problem states")
    min_numbers: int = Field(3, ge=2, le=6, description="countdown: fewest numbers given")
    max_numbers: int = Field(4, ge=2, le=6, description="countdown: most numbers given")
    max_target: int = Field(100, ge=1, le=1_000_000, description="countdown: largest target")
    worked_solution: bool = Field(True, description="word targets include the worked steps before '#### N'")

    @model_validator(mode="after")
    def _check(self) -> MathOptions:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if self.min_numbers > self.max_numbers:
            raise ValueError(f"min_numbers ({self.min_numbers}) must not exceed max_numbers ({self.max_numbers})")
        return self


# ------------------------------------------------------------------------------------- reading word answers
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_RE = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_COMMAND_RE = re.compile(r"\\[a-zA-Z]+")
_MV_COMMANDS = frozenset({"\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\cdot", "\\times", "\\div", "\\left",
                          "\\right"})
_MV_CHARS_RE = re.compile(r"[0-9.+\-*/(){} \\a-zA-Z]+")


def _clean(candidate: str) -> str:
    """An extracted answer without money/percent signs, unit words in \\text{}, thousands commas, and trailing
    punctuation."""
    text = candidate[:MAX_CANDIDATE_CHARS]
    text = _TEXT_RE.sub(lambda m: m.group(1) if any(c.isdigit() for c in m.group(1)) else " ", text)
    for old, new in (("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("\\!", ""), ("\\,", ""), ("{,}", ","),
                     ("~", " "), ("\u2212", "-")):
        text = text.replace(old, new)
    text = _THOUSANDS_RE.sub("", text).strip()
    return text.rstrip(".,;:!? ").strip()


def _plain_number(text: str) -> Fraction | None:
    """`text` as an exact number when it is a plain integer, decimal or a/b fraction, else None."""
    if not text or len(text) > MAX_NUMBER_DIGITS + 4 or not _PLAIN_RE.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _last_number(text: str) -> str | None:
    found = None
    for found in _NUMBER_RE.finditer(text):
        pass
    return found.group(0).replace(",", "") if found else None


def _first_number(text: str) -> str | None:
    found = _NUMBER_RE.search(text)
    return found.group(0).replace(",", "") if found else None


def _boxed_content(text: str) -> str | None:
    """The brace-matched content of the last \\boxed{...} (or \\fbox{...}) in `text`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    if len(rest) < 2 or rest[0] not in ("\\boxed", "\\fbox", "\\boxed ", "\\fbox "):
        return None
    depth, out = 1, []
    for char in rest[1][:MAX_CANDIDATE_CHARS * 2]:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return "".join(out)
        out.append(char)
    return None


def _hash_answer(text: str) -> str | None:
    """What follows the last '####' on its line."""
    at = text.rfind("####")
    if at < 0:
        return None
    return text[at + 4:].split("\n", 1)[0].strip().lstrip("#").strip()


def final_from_answer(answer: str) -> str | None:
    """The final answer of a worked solution: after '#### ', else in \\boxed{}; commas in numbers removed."""
    found = _hash_answer(answer)
    if found is None:
        found = _boxed_content(answer)
    if found is None:
        return None
    found = _clean(found)
    return found if found and any(c.isdigit() for c in found) else None


# ------------------------------------------------------------------------------ exact LaTeX arithmetic
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
    value = _plain_number(text)
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


# ---------------------------------------------------------------------------------------------- math-verify
class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    """math-verify's parse/verify, imported on first use (it pulls in sympy). Its own timeouts are switched
    off: they use signal.alarm, which raises outside the main thread and cannot stop anything sooner than a
    second. `_mv_safe` bounds what it is given instead."""
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except Exception:  # not installed or broken: exact comparison only
        return None
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutWarning())
    config = [LatexExtractionConfig()]
    return (lambda text: parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None),
            lambda gold, pred: verify(gold, pred, timeout_seconds=None))


def _mv_safe(text: str) -> bool:
    """Whether math-verify may see `text`: short, digits and arithmetic with a few LaTeX commands, no letters
    outside them, balanced and shallow brackets, no long numbers. Powers, factorials and free text are refused
    because sympy can spend seconds on them."""
    if not text or len(text) > MV_MAX_CHARS or not _MV_CHARS_RE.fullmatch(text):
        return False
    if any(c not in _MV_COMMANDS for c in _COMMAND_RE.findall(text)):
        return False
    if any(c.isalpha() for c in _COMMAND_RE.sub("", text)):
        return False
    stack: list[str] = []
    depth = 0
    for char in text:
        if char in "({":
            stack.append(char)
            depth = max(depth, len(stack))
        elif char in ")}":
            if not stack or "({"[")}".index(char)] != stack.pop():
                return False
    if stack or depth > 3:
        return False
    return max((len(m) for m in re.findall(r"\d+", text)), default=0) <= 20


@functools.lru_cache(maxsize=4096)
def _mv_equal(gold: str, answer: str) -> bool | None:
    """math-verify's judgement, or None when it cannot be asked (unsafe input, parse failure, any error)."""
    tools = _math_verify()
    if tools is None or not (_mv_safe(gold) and _mv_safe(answer)):
        return None
    try:
        gold_parsed, answer_parsed = tools[0](gold), tools[0](answer)
        if not gold_parsed or not answer_parsed:
            return None
        return bool(tools[1](gold_parsed, answer_parsed))
    except Exception:
        return None


def warm_up() -> None:
    """Import math-verify and sympy (about a second) before the first irrational reference answer needs them."""
    _mv_equal("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")


def compare_answers(gold: str, answer: str, first: bool = False) -> tuple[bool | None, str]:
    """(equal?, how it was decided); equal is None when `answer` holds no usable number.

    A rational reference (every GSM8K and generated answer) is compared exactly with the answer's value: a
    number, or small LaTeX arithmetic (`exact_value`), else the answer's last number (its first with `first`,
    for '#### 18 apples'). math-verify is asked
    only when the reference itself is not rational (``\\sqrt{2}``): its LaTeX parser takes 20-200 ms on each
    new shape of input, too slow for the per-call budget, and for a rational reference exact arithmetic
    decides the same question deterministically."""
    digits = max((len(m) for m in re.findall(r"\d+", answer)), default=0)
    if digits > MAX_NUMBER_DIGITS:
        return False, "too many digits"
    gold_value, answer_value = exact_value(gold), exact_value(answer)
    if isinstance(gold_value, Fraction):
        if answer_value is not None:
            return gold_value == answer_value, "exact"
        number = _first_number(answer) if first else _last_number(answer)
        value = _plain_number(number) if number is not None else None
        if value is not None:
            return gold_value == value, f"exact ({'first' if first else 'last'} number of the answer)"
        return None, "no number"
    judged = _mv_equal(gold, answer)
    if judged is not None:
        return judged, "math-verify"
    if answer.replace(" ", "") == gold.replace(" ", ""):
        return True, "text"
    number = _last_number(answer)
    return (None, "no number") if number is None else (False, "text")


def judge_word(gold: str, output_text: str) -> Verdict:
    """Compare the final answer in `output_text` with `gold`."""
    tail = output_text[-TAIL_CHARS:]
    attempts = (("####", _hash_answer(tail)), ("\\boxed", _boxed_content(tail)), ("last number", None))
    for method, raw in attempts:
        if method == "last number":
            raw = _last_number(tail)
        if raw is None:
            continue
        candidate = _clean(raw)
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


# ------------------------------------------------------------------------------------------------ countdown
_EXPRESSION_CHARS_RE = re.compile(r"[0-9+\-*/() ]*")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class _Rejected(Exception):
    """An expression that breaks the rules; the message is the reason."""


def _expression_from_output(text: str) -> str:
    """The expression in a countdown answer: the last non-empty line, without quoting, '= target' or a
    trailing full stop; typographic operators become ASCII."""
    tail = text[-(MAX_EXPRESSION_CHARS * 4):]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    for old, new in (("\u00d7", "*"), ("\u22c5", "*"), ("\u00b7", "*"), ("\u00f7", "/"), ("\u2212", "-"),
                     ("\u2013", "-"), ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/")):
        line = line.replace(old, new)
    line = line.strip("`$ ").rstrip(".").strip()
    if ":" in line:  # "Answer: (4+6)*3"
        line = line.rsplit(":", 1)[1].strip("`$ ")
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
    left, right = _evaluate(node.left), _evaluate(node.right)
    op = type(node.op)
    if op is ast.Add:
        return left + right
    if op is ast.Sub:
        return left - right
    if op is ast.Mult:
        return left * right
    if right == 0:
        raise _Rejected("divides by zero")
    return left / right


def check_expression(expression: str, numbers: list[int]) -> Fraction:
    """The exact value of a countdown `expression` over `numbers`; raises `_Rejected` with the reason when it
    is not a well-formed expression of the given numbers (each used at most as often as given)."""
    if not expression:
        raise _Rejected("no expression found")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _Rejected(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _EXPRESSION_CHARS_RE.fullmatch(expression):
        bad = next(c for c in expression if not _EXPRESSION_CHARS_RE.fullmatch(c))
        raise _Rejected(f"character {bad!r} is not a digit, + - * / or a parenthesis")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Rejected("not a well-formed expression") from None
    used: Counter[int] = Counter()
    count = 0
    for node in ast.walk(tree):
        count += 1
        if count > MAX_EXPRESSION_NODES:
            raise _Rejected(f"expression has more than {MAX_EXPRESSION_NODES} parts")
        if isinstance(node, (ast.Expression, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub)):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used[node.value] += 1
            continue
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise _Rejected(f"{what} is not allowed (only numbers, + - * /, unary minus, parentheses)")
    available = Counter(numbers)
    for number, times in sorted(used.items()):
        if number not in available:
            raise _Rejected(f"uses {number}, which is not one of the numbers")
        if times > available[number]:
            raise _Rejected(f"uses {number} {times} times but it is given {available[number]} time(s)")
    try:
        return _evaluate(tree.body)
    except RecursionError:
        raise _Rejected("expression nested too deeply") from None


def judge_countdown(numbers: list[int], target: int, output_text: str) -> Verdict:
    """Correct: a well-formed expression of the given numbers equal to the target (score 1). Valid but wrong
    value: score 0.5 (it kept the rules). Anything else: invalid, score 0."""
    expression = _expression_from_output(output_text)
    try:
        value = check_expression(expression, numbers)
    except _Rejected as exc:
        return Verdict(False, False, 0.0, str(exc), {"expression": expression[:MAX_EXPRESSION_CHARS]})
    shown = str(value) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    details = {"expression": expression, "value": shown, "target": target}
    if value == target:
        return Verdict(True, True, 1.0, f"{expression} = {target}", details)
    return Verdict(True, False, 0.5, f"{expression} = {shown}, not {target}", details)


def _render(left: tuple[int, str, int], op: str, right: tuple[int, str, int], value: Any) -> tuple[Any, str, int]:
    """Combine two (value, text, precedence) items with the fewest parentheses that keep the meaning."""
    prec = 1 if op in "+-" else 2
    left_text = f"({left[1]})" if left[2] < prec else left[1]
    right_text = f"({right[1]})" if right[2] < prec or (right[2] == prec and op in "-/") else right[1]
    return value, f"{left_text}{op}{right_text}", prec


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression over some of `numbers` (each at most once) equal to `target`, or None; exhaustive search
    over pairs of intermediate results, with failed multisets remembered."""
    goal = Fraction(target)
    items = [(Fraction(n), str(n), 3) for n in numbers]
    for value, text, _ in items:
        if value == goal:
            return text
    failed: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str, int]]) -> str | None:
        if len(items) < 2:
            return None
        signature = tuple(sorted(item[0] for item in items))
        if signature in failed:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                a, b = items[i], items[j]
                rest = [item for k, item in enumerate(items) if k not in (i, j)]
                options = [("-", a[0] - b[0]), ("/", a[0] / b[0] if b[0] else None)]
                if i < j:
                    options += [("+", a[0] + b[0]), ("*", a[0] * b[0])]
                for op, value in options:
                    if value is None:
                        continue
                    made = _render(a, op, b, value)
                    if value == goal:
                        return made[1]
                    found = search([*rest, made])
                    if found is not None:
                        return found
        failed.add(signature)
        return None

    return search(items)


# --------------------------------------------------------------------------------------- arithmetic problems
_PEOPLE = (("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Sam", "he", "his"),
           ("Zoe", "she", "her"), ("Max", "he", "his"), ("Ivy", "she", "her"), ("Ben", "he", "his"),
           ("Lily", "she", "her"), ("Tom", "he", "his"), ("Nora", "she", "her"), ("Jack", "he", "his"))
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "coins",
          "eggs", "beads")
_ADD = ("{P} buys {b} more.", "{P} finds {b} more.", "{P} gets {b} more from a friend.")
_SUB = ("{P} gives {b} to a friend.", "{P} loses {b}.", "{P} sells {b}.")
_MUL = {2: "{P} doubles {their} {item}.", 3: "{P} triples {their} {item}."}


def _divisors(value: int, limit: int) -> list[int]:
    return [k for k in range(2, min(value, limit) + 1) if value % k == 0 and value // k >= 1]


def make_arithmetic(rng: random.Random, min_steps: int, max_steps: int, max_operand: int) -> dict[str, Any]:
    """One word problem of `min_steps..max_steps` operations; every intermediate value is a whole number
    >= 1, and each operation is one 'a op b = c' line of the worked solution."""
    name, subject, their = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    steps = rng.randint(min_steps, max_steps)
    fill = {"N": name, "P": subject.capitalize(), "p": subject, "their": their, "item": item}
    sentences: list[str] = []
    lines: list[str] = []

    def line(a: int, op: str, b: int, c: int, who: str | None = None, what: str | None = None) -> None:
        who = who or (name if not lines else subject.capitalize())
        verb = "gets" if who == "Each friend" else ("fills" if what == "boxes" else "has")
        lines.append(f"{who} {verb} {a} {op} {b} = {c} {what or item}.")

    if steps >= 1 and rng.random() < 0.35:
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
        value = a * b
        sentences.append(f"{name} has {a} bags with {b} {item} in each.")
        line(a, "*", b, value)
        steps -= 1
    else:
        value = rng.randint(2, max_operand)
        sentences.append(f"{name} has {value} {item}.")
    question = f"How many {item} does {name} have now?" if steps else f"How many {item} does {name} have?"
    for step in range(steps):
        last = step == steps - 1
        choices = ["add"] * 4 + (["sub"] * 4 if value >= 2 else []) + (["mul"] if value <= 500 else [])
        divisors = _divisors(value, max_operand) if last else []
        if divisors:
            choices += ["share", "group"]
        kind = rng.choice(choices)
        if kind == "add":
            b = rng.randint(1, max_operand)
            sentences.append(rng.choice(_ADD).format(b=b, **fill))
            line(value, "+", b, value + b)
            value += b
        elif kind == "sub":
            b = rng.randint(1, min(value - 1, max_operand))
            sentences.append(rng.choice(_SUB).format(b=b, **fill))
            line(value, "-", b, value - b)
            value -= b
        elif kind == "mul":
            k = rng.choice((2, 3))
            sentences.append(_MUL[k].format(**fill))
            line(value, "*", k, value * k)
            value *= k
        elif kind == "share":
            k = rng.choice(divisors)
            sentences.append(f"{subject.capitalize()} shares them equally among {k} friends.")
            question = f"How many {item} does each friend get?"
            line(value, "/", k, value // k, who="Each friend")
            value //= k
        else:
            k = rng.choice(divisors)
            sentences.append(f"{subject.capitalize()} packs them into boxes of {k}.")
            question = f"How many boxes does {subject} fill?"
            line(value, "/", k, value // k, who=subject.capitalize() if lines else name, what="boxes")
            value //= k
    text = " ".join([*sentences, question])
    answer = "\n".join([*lines, f"#### {value}"])
    return {"kind": "word", "question": text, "answer": answer, "final": str(value), "numbers": None,
            "target_value": None}


def make_countdown(rng: random.Random, min_numbers: int, max_numbers: int, max_operand: int,
                   max_target: int) -> dict[str, Any]:
    """Numbers and a target built by combining a random subset of them with random operations (subtraction
    kept positive, division exact), so the puzzle always has the returned expression as a solution."""
    count = rng.randint(min_numbers, max_numbers)
    for _ in range(1000):
        numbers = [rng.randint(1, max_operand) for _ in range(count)]
        used = count if count == 2 or rng.random() < 0.7 else rng.randint(2, count)
        items = [(n, str(n), 3) for n in rng.sample(numbers, used)]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            a, b = items[i], items[j]
            ops = ["+", "*"] + (["-"] if a[0] > b[0] else []) + (["/"] if b[0] > 1 and a[0] % b[0] == 0 else [])
            op = rng.choice(ops)
            value = {"+": a[0] + b[0], "*": a[0] * b[0], "-": a[0] - b[0], "/": a[0] // max(b[0], 1)}[op]
            items = [item for k, item in enumerate(items) if k not in (i, j)] + [_render(a, op, b, value)]
        target, expression = items[0][0], items[0][1]
        if 1 <= target <= max_target and target not in numbers:
            break
    else:  # options too tight for random search: x - y with x = y + target
        target = rng.randint(1, max(1, min(max_target, max_operand - 1)))
        y = rng.randint(1, max(1, max_operand - target))
        numbers = [y + target, y] + [rng.randint(1, max_operand) for _ in range(count - 2)]
        rng.shuffle(numbers)
        expression = f"{y + target}-{y}"
    return countdown_example(numbers, target, expression)


def countdown_question(numbers: list[int], target: int) -> str:
    return (f"Use the numbers {', '.join(str(n) for n in numbers)} (each at most once) and + - * / "
            f"to make {target}.")


def countdown_example(numbers: list[int], target: int, expression: str) -> dict[str, Any]:
    return {"kind": "countdown", "question": countdown_question(numbers, target), "answer": None,
            "final": expression, "numbers": list(numbers), "target_value": target}


# ------------------------------------------------------------------------------------------------------ task
def _column(row: dict[str, Any], columns: dict[str, str], field: str, candidates: tuple[str, ...]):
    """(column name, value) of a task field: the mapped column, else the first default name present."""
    if field in columns:
        name = columns[field]
        return name, row.get(name)
    for name in candidates:
        if name in row and row[name] is not None:
            return name, row[name]
    return candidates[0], None


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise RowError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        return int(value)
    raise RowError(f"{what} must be a whole number, got {str(value)[:40]!r}")


@register_task
class MathTask(Task):
    """Word problems with a numeric answer (GSM8K style, generated arithmetic) and countdown puzzles."""

    name = "math"
    Options = MathOptions
    description = "math word problems ('#### N' answers, GSM8K style) and countdown expressions"
    column_fields = ("question", "answer", "final", "numbers", "target_value")
    options: MathOptions

    def default_size(self, split: str) -> int:
        return 20_000 if split == "train" else 500

    # ---- data
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        o = self.options
        if o.family == "countdown":
            return [make_countdown(rng, o.min_numbers, o.max_numbers, o.max_operand, o.max_target)
                    for _ in range(size)]
        return [make_arithmetic(rng, o.min_steps, o.max_steps, o.max_operand) for _ in range(size)]

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        numbers_column, numbers = _column(row, columns, "numbers", NUMBERS_COLUMNS)
        question_column, question = _column(row, columns, "question", QUESTION_COLUMNS)
        if row.get("kind") == "countdown" or (numbers is not None and question is None and "question" not in columns):
            return self._countdown_row(row, columns, numbers_column, numbers)
        if question is None or (isinstance(question, str) and not question.strip()):
            raise RowError(f"missing column '{question_column}' (the question); map it with "
                           f"columns: {{question: <name>}}")
        if not isinstance(question, str):
            raise RowError(f"column '{question_column}' must be text")
        answer_column, answer = _column(row, columns, "answer", ANSWER_COLUMNS)
        _, final = _column(row, columns, "final", FINAL_COLUMNS)
        if answer is not None and not isinstance(answer, str):
            raise RowError(f"column '{answer_column}' must be text")
        if final is not None:
            final = _clean(str(final))
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
        elif _hash_answer(answer) is None:
            answer = f"{answer.rstrip()}\n#### {final}"
        return {"kind": "word", "question": question.strip(), "answer": answer.strip(), "final": final,
                "numbers": None, "target_value": None}

    def _countdown_row(self, row: dict[str, Any], columns: dict[str, str], numbers_column: str,
                       numbers: Any) -> dict[str, Any]:
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
        numbers = [_int(n, f"column '{numbers_column}'") for n in numbers]
        if any(abs(n) > 1_000_000 for n in numbers):
            raise RowError(f"column '{numbers_column}': numbers must be at most 1,000,000 in size")
        target_column, target = _column(row, columns, "target_value", TARGET_COLUMNS)
        if target is None:
            raise RowError(f"missing column '{target_column}' (the countdown target)")
        target = _int(target, f"column '{target_column}'")
        expression_column, expression = _column(row, columns, "final", EXPRESSION_COLUMNS)
        if expression is not None:
            expression = str(expression).strip()
            try:
                ok = check_expression(expression, numbers) == target
            except _Rejected as exc:
                raise RowError(f"column '{expression_column}': {exc}") from None
            if not ok:
                raise RowError(f"column '{expression_column}': '{expression[:60]}' does not make {target}")
        else:
            if len(numbers) > MAX_SOLVE_NUMBERS:
                raise RowError(f"no solution column and more than {MAX_SOLVE_NUMBERS} numbers to search; "
                               f"add a column '{EXPRESSION_COLUMNS[0]}' with an expression")
            expression = solve_countdown(numbers, target)
            if expression is None:
                raise RowError(f"no expression of {numbers} makes {target}")
        return countdown_example(numbers, target, expression)

    # ---- format
    @staticmethod
    def _is_countdown(example: dict[str, Any]) -> bool:
        return example.get("kind") == "countdown"

    def prompt(self, example: dict[str, Any]) -> str:
        if self._is_countdown(example):
            return f"{countdown_question(example['numbers'], example['target_value'])} {COUNTDOWN_INSTRUCTION}"
        return f"{example['question']}\n{WORD_INSTRUCTION}"

    def target(self, example: dict[str, Any]) -> str:
        if self._is_countdown(example):
            return example["final"]
        if self.options.worked_solution and example.get("answer"):
            return example["answer"]
        return f"#### {example['final']}"

    def key(self, example: dict[str, Any]) -> str:
        if self._is_countdown(example):
            return f"countdown {sorted(example['numbers'])} -> {example['target_value']}"
        return example["question"]

    # ---- judging
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            if not isinstance(output_text, str):
                output_text = str(output_text)
            if self._is_countdown(example):
                numbers, target = example.get("numbers"), example.get("target_value")
                if not numbers or target is None:
                    return Verdict(False, False, 0.0, "the example has no numbers or target")
                return judge_countdown(list(numbers), int(target), output_text)
            gold = example.get("final")
            gold = _clean(str(gold)) if gold not in (None, "") else final_from_answer(example.get("answer") or "")
            if not gold:
                return Verdict(False, False, 0.0, "the example has no reference answer")
            return judge_word(gold, output_text)
        except Exception as exc:  # the contract: never raise on any string
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})")

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Countdown: offsets of characters that cannot appear in an expression."""
        if not self._is_countdown(example):
            return []
        return [i for i, char in enumerate(partial_text) if char not in "0123456789+-*/() "]
