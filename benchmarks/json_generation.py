"""JSON-schema task speed: generated examples per second (with prompt and target), and validations per second on
the 100 shipped json-mode-eval references (the reference itself, a corrupted copy, and a fenced copy with prose).

Run: python benchmarks/json_generation.py [--examples 5000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time

from dgemma_ft.tasks import SourceSpec, get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples to generate")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on each validation kind")
    args = parser.parse_args()
    task = get_task("json")

    started = time.perf_counter()
    examples = task.generate(args.examples, 0)
    for example in examples:
        task.prompt(example), task.target(example)
    elapsed = time.perf_counter() - started
    lengths = sorted(len(task.prompt(e)) for e in examples)
    print(f"generation: {args.examples / elapsed:,.0f} examples/s ({args.examples} in {elapsed:.2f} s; prompt "
          f"chars median {lengths[len(lengths) // 2]}, max {lengths[-1]})")

    public = [dict(row) for row in task.build_dataset("eval", SourceSpec(source="json/json_mode_eval.jsonl"))]
    answers = {
        "reference": [task.target(e) for e in public],
        "corrupted": [task.target(e).replace(":", ": 1,", 1)[:-2] for e in public],
        "fenced+prose": [f"Here you go:\n```json\n{json.dumps(json.loads(task.target(e)), indent=2)}\n```\nDone."
                         for e in public],
    }
    for kind, texts in answers.items():
        done, correct, worst = 0, 0, 0.0
        started = time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            for example, text in zip(public, texts):
                one = time.perf_counter()
                correct += task.validate(example, text).correct
                worst = max(worst, time.perf_counter() - one)
            done += len(public)
        elapsed = time.perf_counter() - started
        print(f"validation ({kind}): {done / elapsed:,.0f} validations/s over {len(public)} json-mode-eval rows, "
              f"{correct / done:.0%} correct, slowest {worst * 1000:.2f} ms")


if __name__ == "__main__":
    main()
