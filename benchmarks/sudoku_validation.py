"""Sudoku validator speed against its 50 ms per call target (pure Python, one CPU core).

Run: python benchmarks/sudoku_validation.py [--answers 3000]
Prints, for a 4x4 and a 9x9 puzzle, the median, 99th percentile and slowest validate() call over seeded near-miss
answers (the solved grid with a cell changed, text inserted, cut short, wrapped in prose, digits permuted, or
random text), then the slowest call over a dozen hostile answers of about a million characters. The 99th
percentile is the figure to compare: a shared machine meets the odd scheduler or GC pause, which says nothing
about the validator. A few seconds.
"""

from __future__ import annotations

import argparse
import random
import time

from dgemma_ft.tasks import get_task

TARGET_MS = 50.0
NOISE = "0123456789 \n|-+,.xé"


def near_misses(target: str, count: int, rng: random.Random) -> list[str]:
    """`count` answers close to `target`, drawn the way the fuzz tests draw them."""
    def one() -> str:
        at = rng.randint(0, len(target))
        noise = "".join(rng.choice(NOISE) for _ in range(rng.randint(0, 10)))
        kind = rng.randrange(6)
        if kind == 0:
            return target[:at] + rng.choice(NOISE) + target[at + 1:]
        if kind == 1:
            return target[:at] + noise + target[at:]
        if kind == 2:
            return target[:at]
        if kind == 3:
            return noise * 5 + target + noise * 5
        if kind == 4:
            digits = [str(d) for d in range(1, 10)]
            shuffled = digits[:]
            rng.shuffle(shuffled)
            return target.translate(str.maketrans("".join(digits), "".join(shuffled)))
        return "".join(rng.choice(NOISE) for _ in range(rng.randint(0, 300)))
    return [one() for _ in range(count)]


def hostile(target: str, rng: random.Random) -> list[str]:
    return ["1234" * 300_000, "0" * 1_000_000, "x" * 1_000_000, "\n" * 1_000_000, "1\n" * 500_000,
            "1a" * 500_000, "123456789012345x" * 70_000, "1 2 | " * 200_000, "é漢🙂" * 300_000,
            "".join(rng.choice("0123456789 \n|-x") for _ in range(1_000_000)), "x" * 999_000 + target,
            target + "9" * 1_000_000, "\u0663" * 1_000_000]


def timings(task, example: dict, texts: list[str]) -> list[float]:
    """Milliseconds of each validate() call, sorted."""
    spent = []
    for text in texts:
        started = time.perf_counter()
        task.validate(example, text)
        spent.append((time.perf_counter() - started) * 1000)
    return sorted(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=3000, help="near-miss answers per grid size")
    args = parser.parse_args()
    cases = [("4x4", {"box_rows": 2, "box_cols": 2, "min_blanks": 5, "max_blanks": 9}),
             ("9x9", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})]
    print(f"validate() per call, target under {TARGET_MS:.0f} ms (one core):")
    for label, options in cases:
        task = get_task("sudoku", options)
        example = task.generate(1, 0)[0]
        target = task.target(example)
        rng = random.Random(0)
        spent = timings(task, example, near_misses(target, args.answers, rng))
        p99 = spent[int(len(spent) * 0.99)]
        print(f"  {label} near misses ({len(spent)}): median {spent[len(spent) // 2]:.3f} ms, p99 {p99:.3f} ms, "
              f"slowest {spent[-1]:.2f} ms  {'ok' if p99 < TARGET_MS else 'OVER TARGET'}")
        spent = timings(task, example, hostile(target, rng))
        print(f"  {label} hostile ~1M-char answers ({len(spent)}): median {spent[len(spent) // 2]:.2f} ms, "
              f"slowest {spent[-1]:.2f} ms  {'ok' if spent[-1] < TARGET_MS else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
