"""The math-verify fallback: equivalence of answers that are not rational numbers (``\\sqrt{2}`` against
``\\frac{2}{\\sqrt{2}}``), where exact arithmetic cannot decide.

Its cost (benchmarks/math_validation.py): about 1.6 s on first use (math-verify imports sympy), then 1-600 ms on
each input shape it has not seen, so it is kept off the path of rational references. Call `warm_up()` before
timing anything that may reach it."""

from __future__ import annotations

import functools
import logging
import re

MV_MAX_CHARS = 40  # the most characters of an answer handed to math-verify, after the guard below

_COMMAND_RE = re.compile(r"\\[a-zA-Z]+")
_MV_COMMANDS = frozenset({"\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\cdot", "\\times", "\\div", "\\left",
                          "\\right"})
_MV_CHARS_RE = re.compile(r"[0-9.+\-*/(){} \\a-zA-Z]+")


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    """math-verify's parse/verify, imported on first use. Its own timeouts are switched off: they use
    signal.alarm, which raises outside the main thread and cannot stop anything sooner than a second.
    `_mv_safe` bounds what it is given instead."""
    try:  # imported here, not at the top: math-verify pulls in sympy (about a second)
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
def math_verify_equal(gold: str, answer: str) -> bool | None:
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
    """Import math-verify and sympy and run one comparison (about 1.6 s) before the first irrational reference
    answer needs them, so that no timed or deadline-bound call pays for it."""
    math_verify_equal("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")
