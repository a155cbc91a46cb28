"""Judging a Sudoku answer (is it a complete valid grid that keeps every given, and how many blanks are right)
and a draft during sampling (which cells break a rule now). A solve need not equal a stored solution: some
public puzzles have several."""

from __future__ import annotations

from typing import Any

from dgemma_ft.tasks.base import Verdict
from dgemma_ft.tasks.sudoku.answers import read_grid
from dgemma_ft.tasks.sudoku.grid import Grid, analyse_puzzle

COUNT_NODE_LIMIT = 5_000  # solver nodes the validator may spend counting solutions of an unseen puzzle


def reference(example: dict[str, Any], grid: Grid) -> str | None:
    """The solution when the puzzle has exactly one, else None (several, or too costly to count)."""
    known = example.get("n_solutions")
    if known == 1 and example.get("solution"):
        return example["solution"]
    if isinstance(known, int) and known > 1:
        return None
    count, first = analyse_puzzle(grid.box_rows, grid.box_cols, example["puzzle"], COUNT_NODE_LIMIT)
    return first if count == 1 else None


def judge(example: dict[str, Any], text: str, grid: Grid) -> Verdict:
    n = grid.n
    puzzle = [ord(c) - 48 for c in example["puzzle"]]
    cells, found = read_grid(text, n)
    if cells is None:
        return Verdict(False, False, 0.0, f"expected {grid.size} digits, found {found}", {"cells_parsed": found})
    values = [ord(c) - 48 for c in cells]
    givens = [i for i, p in enumerate(puzzle) if p]
    blanks = [i for i, p in enumerate(puzzle) if not p]
    changed = [i for i in givens if values[i] != puzzle[i]]
    outside = [i for i, v in enumerate(values) if not 1 <= v <= n]
    conflicts, first_clash = grid.duplicates(values)
    details = {"cells_parsed": grid.size, "givens": len(givens), "givens_kept": len(givens) - len(changed),
               "givens_changed": [grid.where(i) for i in changed[:10]], "conflicts": len(conflicts),
               "blanks": len(blanks)}
    if not changed and not outside and not conflicts:
        return Verdict(True, True, 1.0, "solved", details)
    solution = reference(example, grid)
    if solution is not None:
        right = sum(values[i] == ord(solution[i]) - 48 for i in blanks)
    else:  # several solutions: credit blanks that break no rule and clash with no given
        right = sum(1 <= values[i] <= n and i not in conflicts and all(puzzle[j] != values[i] for j in grid.peers[i])
                    for i in blanks)
    details["blanks_right"] = right
    score = right / len(blanks) if blanks else 0.0
    if changed:
        reason = f"given changed at {grid.where(changed[0])}"
    elif outside:
        cell = outside[0]
        reason = f"{grid.where(cell)} holds {values[cell]}, not a digit 1..{n}"
    else:
        kind, number, digit = first_clash
        reason = f"{kind} {number} repeats {digit}"
    return Verdict(True, False, score, reason, details)


def draft_violations(puzzle: str, text: str, grid: Grid) -> list[int]:
    """Offsets of cells in a full-length draft (target layout, cell at row*(n+1)+col) that change a given, are
    not a digit 1..n, or repeat a digit in a row, column or box. Givens that still hold their digit are never
    reported: they are right by definition."""
    n, length = grid.n, len(text)
    top = chr(48 + n)
    values = [0] * grid.size
    bad: set[int] = set()
    for cell, offset in enumerate(grid.offsets):
        char = text[offset] if offset < length else ""
        given = puzzle[cell]
        if given != "0":
            values[cell] = ord(given) - 48
            if char != given:
                bad.add(cell)
        elif char and "1" <= char <= top:
            values[cell] = ord(char) - 48
        else:
            bad.add(cell)
    conflicts, _ = grid.duplicates(values)
    bad |= {cell for cell in conflicts if puzzle[cell] == "0"}
    return sorted(grid.offsets[c] for c in bad if grid.offsets[c] < length)
