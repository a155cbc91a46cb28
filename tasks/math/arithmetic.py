"""Generated word problems: short multi-step integer arithmetic about items a person buys, loses, doubles,
shares or packs, with a worked solution of one 'a op b = c' line per step and '#### N'."""

from __future__ import annotations

import random
from typing import Any

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


def make_arithmetic(rng: random.Random, min_steps: int, max_steps: int, max_operand: int,
                    style: str = "sentences") -> dict[str, Any]:
    """One word problem of `min_steps..max_steps` operations; every intermediate value is a whole number
    >= 1, and each operation is one 'a op b = c' line of the worked solution: a sentence, or with
    `style="equations"` the equation alone. The random draws do not depend on the style, so a seed gives the same
    problems either way."""
    name, subject, their = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    steps = rng.randint(min_steps, max_steps)
    fill = {"N": name, "P": subject.capitalize(), "p": subject, "their": their, "item": item}
    sentences: list[str] = []
    lines: list[str] = []

    def line(a: int, op: str, b: int, c: int, who: str | None = None, what: str | None = None) -> None:
        if style == "equations":
            lines.append(f"{a} {op} {b} = {c}")
            return
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
