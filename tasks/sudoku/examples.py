"""The fields of one Sudoku example, made by the seeded generator or read from a source row (a puzzle column, an
optional solution column, or one text line holding both), checked against the configured shape. A row without a
solution is solved here, once: its target and its judging read the stored solution instead of solving again."""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any

from dgemma_ft.errors import UserError
from dgemma_ft.tasks.base import RowError, column
from dgemma_ft.tasks.sudoku.grid import Grid
from dgemma_ft.tasks.sudoku.options import SudokuOptions

# `text`: the one column of a one-puzzle-per-line .txt file (the classic format of public collections)
PUZZLE_COLUMNS = ("puzzle", "Puzzle", "question", "quizzes", "q", "input", "text")
SOLUTION_COLUMNS = ("solution", "Solution", "answer", "solutions", "a", "output")
GRID_TRIES = 200  # full grids tried for one puzzle before the drawn blank count is declared out of reach


def example_fields(grid: Grid, puzzle: list[int], solution: list[int] | None,
                   n_solutions: int | None) -> dict[str, Any]:
    return {"puzzle": "".join(map(str, puzzle)),
            "solution": "".join(map(str, solution)) if solution is not None else None,
            "box_rows": grid.box_rows, "box_cols": grid.box_cols,
            "n_blanks": puzzle.count(0), "n_solutions": n_solutions}


def generate_examples(grid: Grid, options: SudokuOptions, size: int, seed: int) -> list[dict[str, Any]]:
    """`size` puzzles with a blank count drawn from the options' range, each with its solution."""
    rng = random.Random(seed)
    examples = []
    for _ in range(size):
        blanks = rng.randint(options.min_blanks, options.max_blanks)
        for _ in range(GRID_TRIES):
            made = grid.make_puzzle(rng, blanks, options.unique)
            if made is not None:
                break
        else:
            raise UserError(f"task.options.max_blanks: could not make a {grid.n}x{grid.n} puzzle with {blanks} "
                            f"blanks and a unique solution in {GRID_TRIES} tries; lower max_blanks")
        puzzle, solution = made
        n_solutions = 1 if options.unique else None
        if n_solutions is None and grid.size <= 36:
            n_solutions = 1 if grid.count_solutions(puzzle, 2) == 1 else None
        examples.append(example_fields(grid, puzzle, solution, n_solutions))
    return examples


def example_from_row(row: dict[str, Any], columns: dict[str, str], grid: Grid) -> dict[str, Any]:
    """The example of one source row, checked against `grid`'s shape; `RowError` says why a row is unusable."""
    _, raw = column(row, columns, "puzzle", PUZZLE_COLUMNS)
    if raw is None:
        raise RowError(f"no puzzle column with a value (looked for {', '.join(PUZZLE_COLUMNS)}); map one with "
                       f"columns: {{puzzle: NAME}}")
    raw, paired_solution = split_pair(raw, grid)
    puzzle = parse_cells(raw, grid, "puzzle")
    keep_rules(grid, puzzle, "givens break a rule")
    _, raw_solution = column(row, columns, "solution", SOLUTION_COLUMNS)
    if raw_solution in (None, ""):
        raw_solution = paired_solution
    solution = None
    if raw_solution not in (None, ""):
        solution = parse_cells(raw_solution, grid, "solution", blanks_allowed=False)
        keep_rules(grid, solution, "solution is not a valid grid")
        changed = next((i for i, (p, s) in enumerate(zip(puzzle, solution)) if p and p != s), None)
        if changed is not None:
            raise RowError(f"solution does not match the given at {grid.where(changed)}")
    n_solutions = None
    if grid.size <= 36 or solution is None:
        found = grid.solve(puzzle, limit=2)
        if not found:
            raise RowError("the puzzle has no solution")
        n_solutions = len(found)
        if solution is None:
            solution = found[0]
    else:
        claimed = row.get("n_solutions")
        if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > 0:
            n_solutions = claimed
    return example_fields(grid, puzzle, solution, n_solutions)


@lru_cache(maxsize=16)
def _pair_pattern(size: int) -> re.Pattern:
    return re.compile(rf"\s*(\S{{{size}}})(?:\s*[,;]\s*|\s+)(\S{{{size}}})\s*")


def split_pair(value: Any, grid: Grid) -> tuple[Any, str | None]:
    """(puzzle, solution) of a text holding both, separated by a comma, semicolon, space or tab (a line such as
    '4.1...,4312...'); else (value, None)."""
    match = _pair_pattern(grid.size).fullmatch(value) if isinstance(value, str) else None
    return (match.group(1), match.group(2)) if match else (value, None)


def keep_rules(grid: Grid, cells: list[int], broken: str) -> None:
    """Raise `RowError` ("<broken>: row 1 repeats 3") when a digit repeats in a row, column or box."""
    _, clash = grid.duplicates(cells)
    if clash:
        kind, number, digit = clash
        raise RowError(f"{broken}: {kind} {number} repeats {digit}")


def parse_cells(value: Any, grid: Grid, what: str, blanks_allowed: bool = True) -> list[int]:
    """A puzzle or solution from a source row: digits 1..n are values; '0' and any other non-digit (. _ * ?) is a
    blank; whitespace is ignored. A list (possibly nested) of cells is accepted too."""
    if isinstance(value, (list, tuple)):
        value = "".join(_flatten(value))
    text = "".join(str(value).split())
    if len(text) != grid.size:
        raise RowError(f"expected {grid.size} cells for a {grid.n}x{grid.n} grid, got {len(text)}"
                       + ("" if what == "puzzle" else f" in the {what}"))
    cells = []
    for index, char in enumerate(text):
        if "1" <= char <= "9":
            if int(char) > grid.n:
                raise RowError(f"{what} has {char} at {grid.where(index)}, outside 1..{grid.n} for a "
                               f"{grid.n}x{grid.n} grid")
            cells.append(int(char))
        elif not blanks_allowed:
            raise RowError(f"{what} has a blank ({char!r}) at {grid.where(index)}")
        else:
            cells.append(0)
    return cells


def _flatten(items) -> list[str]:
    out: list[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(str(item) if item not in (None, "") else "0")
    return out
