"""Math task speed: examples/s for arithmetic and countdown generation, validations/s on the shipped GSM8K
answers (right, wrong and boxed forms) and on countdown expressions, with the 99.9th percentile of one call.

Run: python benchmarks/math_generation.py [--size 20000] [--repeat 3]   (CPU only, well under a minute)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from dgemma_ft.tasks import DATA_DIR, get_task
from dgemma_ft.tasks.math import warm_up


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f}/s  ({count:,} in {seconds:.2f} s)"


def time_generation(options: dict, size: int) -> tuple[float, list[dict]]:
    task = get_task("math", options)
    started = time.perf_counter()
    examples = task.generate(size, seed=0)
    return time.perf_counter() - started, examples


def time_validation(task, pairs: list[tuple[dict, str]], repeat: int) -> tuple[float, float, int]:
    """(total seconds, 99.9th percentile of one call, correct count of the last pass). The percentile, not the
    maximum: a call that happens to trigger a full garbage collection of the process is timing the collector."""
    gc.collect()
    calls, correct, started = [], 0, time.perf_counter()
    for _ in range(repeat):
        correct = 0
        for example, text in pairs:
            call = time.perf_counter()
            correct += task.validate(example, text).correct
            calls.append(time.perf_counter() - call)
    total = time.perf_counter() - started
    calls.sort()
    return total, calls[int(len(calls) * 0.999)], correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000, help="examples to generate per family")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the validation inputs")
    args = parser.parse_args()

    print("generation")
    for label, options in (("arithmetic (1-3 steps)", {}),
                           ("arithmetic (2-6 steps)", {"min_steps": 2, "max_steps": 6}),
                           ("countdown (3-4 numbers)", {"family": "countdown"}),
                           ("countdown (5-6 numbers)", {"family": "countdown", "min_numbers": 5, "max_numbers": 6})):
        seconds, _ = time_generation(options, args.size)
        print(f"  {label:<26}{rate(args.size, seconds)}")

    task = get_task("math")
    rows = [json.loads(line) for line in (DATA_DIR / "math" / "gsm8k_test.jsonl").read_text("utf-8").splitlines()]
    examples = [task.from_row(row, {}) for row in rows]
    print("validation")
    warm_up()  # math-verify's first use (about 1.5 s, importing sympy) is not a validation's cost
    variants = {
        "GSM8K reference answers": lambda ex, row: row["answer"],
        "GSM8K final changed by +1":
            lambda ex, row: row["answer"].rsplit("####", 1)[0] + f"#### {int(row['final']) + 1}",
        "GSM8K \\boxed{N}": lambda ex, row: f"The total is \\boxed{{{row['final']}}}.",
        "GSM8K \\boxed{\\frac{2N}{2}}": lambda ex, row: f"\\boxed{{\\frac{{{2 * int(row['final'])}}}{{2}}}}",
    }
    for label, make in variants.items():
        pairs = [(ex, make(ex, row)) for ex, row in zip(examples, rows)]
        seconds, p999, correct = time_validation(task, pairs, args.repeat)
        print(f"  {label:<30}{rate(len(pairs) * args.repeat, seconds)}  correct {correct}/{len(pairs)}, "
              f"p99.9 {p999 * 1e3:.2f} ms/call")

    countdown = get_task("math", {"family": "countdown"})
    puzzles = countdown.generate(2000, seed=1)
    for label, make in (("countdown reference", lambda ex: ex["final"]),
                        ("countdown wrong (+1 appended)", lambda ex: f"({ex['final']})+1")):
        pairs = [(ex, make(ex)) for ex in puzzles]
        seconds, p999, correct = time_validation(countdown, pairs, args.repeat)
        print(f"  {label:<30}{rate(len(pairs) * args.repeat, seconds)}  correct {correct}/{len(pairs)}, "
              f"p99.9 {p999 * 1e3:.2f} ms/call")


if __name__ == "__main__":
    main()
