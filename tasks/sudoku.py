"""Sudoku of any box shape (2x2 -> 4x4, 2x3 -> 6x6, 3x3 -> 9x9).

Data: generated puzzles with a unique solution (a bitmask backtracking solver checks uniqueness), or puzzle
strings from files and Hub datasets ('0', '.', '_' or any non-digit marks a blank). Prompt: the grid, one row per
line. Target: the solved grid, one row per line, digits only. A solve is a complete valid grid that keeps every
given; it need not equal a stored solution (some public puzzles have several).
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field, model_validator

from dgemma_ft.tasks.base import RowError, Task, TaskOptions, Verdict, register_task

PUZZLE_COLUMNS = ("puzzle", "Puzzle", "question", "quizzes", "q", "input")
SOLUTION_COLUMNS = ("solution", "Solution", "answer", "solutions", "a", "output")
MAX_SCAN = 4096  # characters of an answer the validator reads; a grid is at most 81 digits plus separators


class SudokuOptions(TaskOptions):
    box_rows: int = Field(2, ge=1, le=3)
    box_cols: int = Field(2, ge=1, le=3)
    min_blanks: int = Field(4, ge=1)
    max_blanks: int = Field(12, ge=1)
    unique: bool = Field(True, description="generated puzzles have exactly one solution")
    prompt_style: Literal["instruction", "grid"] = Field(
        "instruction", description="'instruction' states the rules' shape; 'grid' is the bare grid (small models)")

    @model_validator(mode="after")
    def _check(self) -> SudokuOptions:
        size = self.box_rows * self.box_cols
        if size < 2 or size > 9:
            raise ValueError(f"box_rows x box_cols gives a {size}x{size} grid; cells must be digits 1..9 "
                             f"(use 2x2, 2x3, 3x2 or 3x3)")
        if self.min_blanks > self.max_blanks:
            raise ValueError(f"min_blanks ({self.min_blanks}) must not exceed max_blanks ({self.max_blanks})")
        if self.max_blanks >= size * size:
            raise ValueError(f"max_blanks ({self.max_blanks}) must be below the {size * size} cells of the grid")
        return self


class Grid:
    """Geometry of one board: which cells share a row, column or box."""

    _cache: dict[tuple[int, int], Grid] = {}

    def __init__(self, box_rows: int, box_cols: int):
        self.box_rows, self.box_cols = box_rows, box_cols
        self.n = box_rows * box_cols
        self.cells = self.n * self.n
        self.full = (1 << self.n) - 1
        self.row = [i // self.n for i in range(self.cells)]
        self.col = [i % self.n for i in range(self.cells)]
        self.box = [(self.row[i] // box_rows) * box_rows + self.col[i] // box_cols for i in range(self.cells)]
        self.peers = [sorted({j for j in range(self.cells) if j != i and (
            self.row[j] == self.row[i] or self.col[j] == self.col[i] or self.box[j] == self.box[i])})
            for i in range(self.cells)]

    @classmethod
    def of(cls, box_rows: int, box_cols: int) -> Grid:
        key = (box_rows, box_cols)
        if key not in cls._cache:
            cls._cache[key] = cls(box_rows, box_cols)
        return cls._cache[key]

    # ------------------------------------------------------------------------------------------ solving
    def solve(self, values: list[int], limit: int = 2, rng: random.Random | None = None) -> list[list[int]]:
        """Up to `limit` solutions of `values` (0 = blank), by bitmask backtracking on the most constrained
        cell. `rng` randomises the digit order (for generating random full grids)."""
        rows = [0] * self.n
        cols = [0] * self.n
        boxes = [0] * self.n
        for i, v in enumerate(values):
            if v:
                bit = 1 << (v - 1)
                if rows[self.row[i]] & bit or cols[self.col[i]] & bit or boxes[self.box[i]] & bit:
                    return []
                rows[self.row[i]] |= bit
                cols[self.col[i]] |= bit
                boxes[self.box[i]] |= bit
        grid = list(values)
        blanks = [i for i, v in enumerate(grid) if not v]
        solutions: list[list[int]] = []

        def search() -> bool:
            best, best_mask, best_count = -1, 0, 99
            for i in blanks:
                if grid[i]:
                    continue
                mask = self.full & ~(rows[self.row[i]] | cols[self.col[i]] | boxes[self.box[i]])
                count = bin(mask).count("1")
                if count < best_count:
                    best, best_mask, best_count = i, mask, count
                    if count <= 1:
                        break
            if best < 0:
                solutions.append(list(grid))
                return len(solutions) >= limit
            if best_count == 0:
                return False
            digits = [d for d in range(1, self.n + 1) if best_mask >> (d - 1) & 1]
            if rng is not None:
                rng.shuffle(digits)
            r, c, b = self.row[best], self.col[best], self.box[best]
            for d in digits:
                bit = 1 << (d - 1)
                grid[best] = d
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                if search():
                    return True
                rows[r] &= ~bit
                cols[c] &= ~bit
                boxes[b] &= ~bit
            grid[best] = 0
            return False

        search()
        return solutions

    def conflicts(self, values: list[int]) -> set[int]:
        """Cells whose digit repeats in their row, column or box (0 = blank is never in conflict)."""
        bad = set()
        for i, v in enumerate(values):
            if v and any(values[j] == v for j in self.peers[i]):
                bad.add(i)
        return bad

    def is_solution(self, values: list[int]) -> bool:
        return all(1 <= v <= self.n for v in values) and not self.conflicts(values)

    def layout(self, values: list[int] | str) -> str:
        """One row per line."""
        text = "".join(str(v) for v in values)
        return "\n".join(text[r * self.n:(r + 1) * self.n] for r in range(self.n))

    def offset(self, cell: int) -> int:
        """Character offset of `cell` in the one-row-per-line layout."""
        return self.row[cell] * (self.n + 1) + self.col[cell]


def parse_cells(text: str, n: int, count: int) -> list[int]:
    """Read a puzzle/solution string: digits 1..n are values, '0' '.' '_' '*' and '?' are blanks, whitespace and
    separators are skipped."""
    values = []
    for char in text:
        if char.isdigit() and char != "0":
            value = int(char)
            if value > n:
                raise RowError(f"digit {value} is outside 1..{n} for a {n}x{n} grid")
            values.append(value)
        elif char in "0._*?":
            values.append(0)
        elif char.isspace() or char in "|-+,;":
            continue
        else:
            raise RowError(f"unexpected character {char!r} in the grid")
    if len(values) != count:
        raise RowError(f"expected {count} cells for a {n}x{n} grid, got {len(values)}")
    return values


@register_task
class SudokuTask(Task):
    name = "sudoku"
    Options = SudokuOptions
    description = "Fill the grid so every row, column and box holds each digit once."

    @property
    def grid(self) -> Grid:
        return Grid.of(self.options.box_rows, self.options.box_cols)

    def default_size(self, split: str) -> int:
        return 20_000 if split == "train" else 500

    # ------------------------------------------------------------------------------------------------ data
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        grid = self.grid
        examples = []
        while len(examples) < size:
            solution = grid.solve([0] * grid.cells, limit=1, rng=rng)[0]
            target_blanks = rng.randint(self.options.min_blanks, self.options.max_blanks)
            puzzle = list(solution)
            removed = 0
            for cell in rng.sample(range(grid.cells), grid.cells):
                if removed == target_blanks:
                    break
                kept = puzzle[cell]
                puzzle[cell] = 0
                if self.options.unique and len(grid.solve(puzzle, limit=2)) != 1:
                    puzzle[cell] = kept
                else:
                    removed += 1
            if removed < self.options.min_blanks:
                continue  # this grid cannot lose that many cells uniquely; draw another
            examples.append(self._example(puzzle, solution, n_solutions=1 if self.options.unique else None))
        return examples

    def _example(self, puzzle: list[int], solution: list[int] | None, n_solutions: int | None) -> dict[str, Any]:
        return {"puzzle": "".join(map(str, puzzle)),
                "solution": "".join(map(str, solution)) if solution else None,
                "box_rows": self.options.box_rows, "box_cols": self.options.box_cols,
                "n_blanks": puzzle.count(0), "n_solutions": n_solutions}

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        grid = self.grid
        puzzle_text = _column(row, columns.get("puzzle"), PUZZLE_COLUMNS, "puzzle")
        if puzzle_text is None:
            raise RowError(f"no puzzle column (looked for {columns.get('puzzle') or ', '.join(PUZZLE_COLUMNS)}); "
                           f"map it with columns: {{puzzle: NAME}}")
        puzzle = parse_cells(str(puzzle_text), grid.n, grid.cells)
        if grid.conflicts(puzzle):
            raise RowError("the givens break a row, column or box rule")
        solution_text = _column(row, columns.get("solution"), SOLUTION_COLUMNS, "solution")
        solution = None
        if solution_text not in (None, ""):
            solution = parse_cells(str(solution_text), grid.n, grid.cells)
            if not grid.is_solution(solution):
                raise RowError("the stored solution is not a valid grid")
            if any(p and p != s for p, s in zip(puzzle, solution)):
                raise RowError("the stored solution changes a given")
        n_solutions = row.get("n_solutions") if isinstance(row.get("n_solutions"), int) else None
        if n_solutions is None:
            n_solutions = len(grid.solve(puzzle, limit=2))
            if n_solutions == 0:
                raise RowError("the puzzle has no solution")
        return self._example(puzzle, solution, n_solutions)

    # ---------------------------------------------------------------------------------------------- format
    def prompt(self, example: dict[str, Any]) -> str:
        grid = self.grid
        rows = grid.layout(example["puzzle"])
        if self.options.prompt_style == "grid":
            return rows
        return f"Solve this {grid.n}x{grid.n} Sudoku ({grid.box_rows}x{grid.box_cols} boxes, 0 = blank):\n{rows}"

    def target(self, example: dict[str, Any]) -> str:
        solution = example.get("solution")
        if not solution:
            found = self.grid.solve([int(c) for c in example["puzzle"]], limit=1)
            solution = "".join(map(str, found[0])) if found else example["puzzle"]
        return self.grid.layout(solution)

    def key(self, example: dict[str, Any]) -> str:
        return example["puzzle"]

    # --------------------------------------------------------------------------------------------- judging
    def read_answer(self, text: str) -> tuple[list[int], list[int]]:
        """(cell values, character offset of each) for the first n*n digit cells of `text`; separators skipped."""
        values, offsets = [], []
        count = self.grid.cells
        for index, char in enumerate(text[:MAX_SCAN]):
            if "0" <= char <= "9":
                values.append(int(char))
                offsets.append(index)
                if len(values) == count:
                    break
        return values, offsets

    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            return self._validate(example, output_text if isinstance(output_text, str) else "")
        except Exception as exc:  # never raise on any answer
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})")

    def _validate(self, example: dict[str, Any], text: str) -> Verdict:
        grid = self.grid
        puzzle = [int(c) for c in example["puzzle"]]
        values, _ = self.read_answer(text)
        blanks = [i for i, v in enumerate(puzzle) if not v]
        if len(values) < grid.cells:
            return Verdict(False, False, 0.0, f"expected {grid.cells} digits, found {len(values)}",
                           {"cells_parsed": len(values)})
        changed = [i for i, v in enumerate(puzzle) if v and values[i] != v]
        out_of_range = [i for i, v in enumerate(values) if not 1 <= v <= grid.n]
        conflicts = grid.conflicts(values)
        reference = self._unique_solution(example, puzzle)
        if reference is not None:
            right = sum(values[i] == reference[i] for i in blanks)
        else:
            right = sum(i not in conflicts and 1 <= values[i] <= grid.n for i in blanks)
        score = right / len(blanks) if blanks else 1.0
        details = {"cells_parsed": len(values), "givens_kept": not changed, "conflicts": sorted(conflicts),
                   "changed_givens": changed}
        if changed:
            cell = changed[0]
            return Verdict(True, False, score, f"given changed at r{grid.row[cell] + 1}c{grid.col[cell] + 1}",
                           details)
        if out_of_range:
            cell = out_of_range[0]
            return Verdict(True, False, score, f"r{grid.row[cell] + 1}c{grid.col[cell] + 1} holds "
                                               f"{values[cell]}, not a digit 1..{grid.n}", details)
        if conflicts:
            cell = min(conflicts)
            return Verdict(True, False, score, f"{values[cell]} repeats around r{grid.row[cell] + 1}"
                                               f"c{grid.col[cell] + 1}", details)
        return Verdict(True, True, 1.0, "solved", details)

    def _unique_solution(self, example: dict[str, Any], puzzle: list[int]) -> list[int] | None:
        n_solutions = example.get("n_solutions")
        if n_solutions is None:
            n_solutions = len(self.grid.solve(puzzle, limit=2))
        if n_solutions != 1:
            return None
        if example.get("solution"):
            return [int(c) for c in example["solution"]]
        found = self.grid.solve(puzzle, limit=1)
        return found[0] if found else None

    def pinned(self, example: dict[str, Any]) -> dict[int, str]:
        grid = self.grid
        return {grid.offset(i): c for i, c in enumerate(example["puzzle"]) if c != "0"}

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Offsets (in `partial_text`) of cells that change a given, repeat a digit, or are not a digit 1..n.
        The draft is read in the target layout: cell i at row*(n+1)+col."""
        try:
            grid = self.grid
            text = partial_text if isinstance(partial_text, str) else ""
            values = []
            for cell in range(grid.cells):
                offset = grid.offset(cell)
                char = text[offset] if offset < len(text) else ""
                values.append(int(char) if char.isdigit() and len(char) == 1 and "0" <= char <= "9" else -1)
            bad = set()
            for cell, given in enumerate(example["puzzle"]):
                if given != "0" and values[cell] != int(given):
                    bad.add(cell)
                elif not 1 <= values[cell] <= grid.n:
                    bad.add(cell)
            clean = [v if 1 <= v <= grid.n else 0 for v in values]
            bad |= {c for c in grid.conflicts(clean) if example["puzzle"][c] == "0"}
            return sorted(grid.offset(c) for c in bad if grid.offset(c) < len(text))
        except Exception:
            return []


def _column(row: dict[str, Any], name: str | None, candidates: tuple[str, ...], field: str):
    if name is not None:
        if name not in row:
            raise RowError(f"missing column '{name}' (mapped from {field})")
        return row[name]
    for candidate in candidates:
        if candidate in row and row[candidate] is not None:
            return row[candidate]
    return None
