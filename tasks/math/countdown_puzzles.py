"""Making countdown puzzles and references: a search that solves a puzzle, and a generator whose targets are
built from random expressions, so every puzzle has a solution. With `exactly_once` (the default) a reference
uses every number once; otherwise some may be left out."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any


def _render(left: tuple[int, str, int], op: str, right: tuple[int, str, int], value: Any) -> tuple[Any, str, int]:
    """Combine two (value, text, precedence) items with the fewest parentheses that keep the meaning."""
    prec = 1 if op in "+-" else 2
    left_text = f"({left[1]})" if left[2] < prec else left[1]
    right_text = f"({right[1]})" if right[2] < prec or (right[2] == prec and op in "-/") else right[1]
    return value, f"{left_text}{op}{right_text}", prec


def solve_countdown(numbers: list[int], target: int, exactly_once: bool = True) -> str | None:
    """An expression over all of `numbers`, each used once, equal to `target` (without `exactly_once`: over
    some of them, each at most once), or None; exhaustive search over pairs of intermediate results, with
    failed multisets remembered."""
    goal = Fraction(target)
    items = [(Fraction(n), str(n), 3) for n in numbers]
    if not exactly_once:
        for value, text, _ in items:
            if value == goal:
                return text
    failed: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str, int]]) -> str | None:
        if len(items) < 2:
            return items[0][1] if exactly_once and items and items[0][0] == goal else None
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
                    if value == goal and not exactly_once:
                        return made[1]
                    found = search([*rest, made])
                    if found is not None:
                        return found
        failed.add(signature)
        return None

    return search(items)


def make_countdown(rng: random.Random, min_numbers: int, max_numbers: int, max_operand: int, max_target: int,
                   exactly_once: bool = True) -> dict[str, Any]:
    """Numbers and a target built by combining them (without `exactly_once`, a random subset of them in about
    one puzzle in four) with random operations (subtraction kept positive, division exact), so the puzzle
    always has the returned expression as a solution."""
    count = rng.randint(min_numbers, max_numbers)
    for _ in range(1000):
        numbers = [rng.randint(1, max_operand) for _ in range(count)]
        used = count if exactly_once or count == 2 or rng.random() < 0.7 else rng.randint(2, count)
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
    else:  # options too tight for random search: x - y with x = y + target, the other numbers cancelling out
        target = rng.randint(1, max(1, min(max_target, max_operand - 1)))
        y = rng.randint(1, max(1, max_operand - target))
        pairs = [rng.randint(1, max_operand) for _ in range((count - 2) // 2)]
        numbers = [y + target, y] + [k for k in pairs for _ in range(2)] + [1] * (count % 2)
        rng.shuffle(numbers)
        expression = f"{y + target}-{y}{'*1' * (count % 2)}" + "".join(f"+{k}-{k}" for k in pairs)
    return countdown_example(numbers, target, expression, exactly_once)


def countdown_question(numbers: list[int], target: int, exactly_once: bool = True) -> str:
    return (f"Use the numbers {', '.join(str(n) for n in numbers)} "
            f"(each {'exactly' if exactly_once else 'at most'} once) and + - * / to make {target}.")


def countdown_example(numbers: list[int], target: int, reference: str, exactly_once: bool = True) -> dict[str, Any]:
    return {"kind": "countdown", "question": countdown_question(numbers, target, exactly_once), "answer": None,
            "final": reference, "numbers": list(numbers), "target_value": target}
