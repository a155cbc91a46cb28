"""Sudoku generation and solver speed (pure Python, one CPU core).

Run: python benchmarks/sudoku_generation.py [--seconds 8]
Prints puzzles/s for unique 4x4 (4-12 blanks), 6x6 (10-20 blanks) and 9x9 (40-50 blanks) puzzles, and solves/s
(first solution, and counting up to 2 for a uniqueness check) on the 972 Dream 4x4 puzzles. About a minute at most.
"""

from __future__ import annotations

import argparse
import time

from dgemma_ft.tasks import SourceSpec, get_task


def generation_rate(options: dict, seconds: float) -> tuple[float, int]:
    task = get_task("sudoku", options)
    made, seed, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        made += len(task.generate(20, seed))
        seed += 1
    return made / (time.perf_counter() - started), made


def solve_rate(seconds: float) -> tuple[float, float, int]:
    task = get_task("sudoku", {"box_rows": 2, "box_cols": 2})
    examples = [dict(row) for row in task.build_dataset("eval", SourceSpec(source="sudoku4/dream_4x4.jsonl"))]
    grid = task.grid
    puzzles = [[int(c) for c in e["puzzle"]] for e in examples]
    for puzzle, example in zip(puzzles, examples):  # all unique: the solver must find the stored solution
        assert len(grid.solve(puzzle, limit=2)) == 1
        assert "".join(map(str, grid.solve(puzzle, limit=1)[0])) == example["solution"]
    rates = []
    for limit in (1, 2):
        solved, started = 0, time.perf_counter()
        while solved == 0 or time.perf_counter() - started < seconds:
            for puzzle in puzzles:
                grid.solve(puzzle, limit=limit)
            solved += len(puzzles)
        rates.append(solved / (time.perf_counter() - started))
    return rates[0], rates[1], len(puzzles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time spent on each measurement")
    args = parser.parse_args()
    cases = [("4x4, 4-12 blanks", {"box_rows": 2, "box_cols": 2, "min_blanks": 4, "max_blanks": 12}),
             ("6x6, 10-20 blanks", {"box_rows": 2, "box_cols": 3, "min_blanks": 10, "max_blanks": 20}),
             ("9x9, 40-50 blanks", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})]
    print("unique-solution puzzle generation (one core):")
    for label, options in cases:
        rate, made = generation_rate(options, args.seconds)
        print(f"  {label:<18} {rate:10.1f} puzzles/s  ({made} made)")
    first, counted, count = solve_rate(args.seconds)
    print(f"solver on the {count} Dream 4x4 puzzles:")
    print(f"  first solution     {first:10.0f} solves/s")
    print(f"  count up to 2      {counted:10.0f} solves/s")


if __name__ == "__main__":
    main()
