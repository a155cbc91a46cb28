"""Reading word answers: where the final answer stands in a text (``#### N``, ``\\boxed{...}``, the last
number) and how an extracted answer is cleaned (money and percent signs, ``\\text{}`` units, thousands commas)."""

from __future__ import annotations

import re
from fractions import Fraction

TAIL_CHARS = 2000          # a word answer is judged on its last 2,000 characters
MAX_CANDIDATE_CHARS = 100  # an extracted final answer is cut to this length
MAX_NUMBER_DIGITS = 60     # longer numbers are never equal to a reference answer (and are not converted)

_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_RE = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def clean(candidate: str) -> str:
    """An extracted answer without money/percent signs, unit words in \\text{}, thousands commas, and trailing
    punctuation."""
    text = candidate[:MAX_CANDIDATE_CHARS]
    text = _TEXT_RE.sub(lambda m: m.group(1) if any(c.isdigit() for c in m.group(1)) else " ", text)
    for old, new in (("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("\\!", ""), ("\\,", ""), ("{,}", ","),
                     ("~", " "), ("\u2212", "-")):
        text = text.replace(old, new)
    text = _THOUSANDS_RE.sub("", text).strip()
    return text.rstrip(".,;:!? ").strip()


def plain_number(text: str) -> Fraction | None:
    """`text` as an exact number when it is a plain integer, decimal or a/b fraction, else None."""
    if not text or len(text) > MAX_NUMBER_DIGITS + 4 or not _PLAIN_RE.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    found = None
    for found in _NUMBER_RE.finditer(text):
        pass
    return found.group(0).replace(",", "") if found else None


def first_number(text: str) -> str | None:
    found = _NUMBER_RE.search(text)
    return found.group(0).replace(",", "") if found else None


def boxed_content(text: str) -> str | None:
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


def hash_answer(text: str) -> str | None:
    """What follows the last '####' on its line."""
    at = text.rfind("####")
    if at < 0:
        return None
    return text[at + 4:].split("\n", 1)[0].strip().lstrip("#").strip()


def final_from_answer(answer: str) -> str | None:
    """The final answer of a worked solution: after '#### ', else in \\boxed{}; commas in numbers removed."""
    found = hash_answer(answer)
    if found is None:
        found = boxed_content(answer)
    if found is None:
        return None
    found = clean(found)
    return found if found and any(c.isdigit() for c in found) else None
