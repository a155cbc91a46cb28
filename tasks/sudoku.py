"""Sudoku with any box shape: 2x2 boxes make a 4x4 grid, 2x3 a 6x6, 3x3 a 9x9 (at most 9x9, so cells are digits).

Data: puzzles generated with a unique solution (a bitmask backtracking solver checks uniqueness while cells are
removed), or puzzle strings read from files and Hub datasets ('0', '.', '_' or any other non-digit marks a blank).
Prompt: one line of instructions and the grid, one row per line. Target: the solved grid, one row per line.
A solve is any complete valid grid that keeps every given; it need not equal a stored solution, because some
public puzzles have several.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from dgemma_ft.errors import UserError
from dgemma_ft.tasks.base import RowError, Task, TaskOptions, Verdict, register_task

PUZZLE_COLUMNS = ("puzzle", "Puzzle", "question", "quizzes", "q", "input")
SOLUTION_COLUMNS = ("solution", "Solution", "answer", "solutions", "a", "output")
# The fewest givens a uniquely solvable grid of each side can have (more blanks can never be unique).
MIN_GIVENS = {4: 4, 6: 8, 9: 17}
MAX_SCAN = 100_000  # characters of an answer the validator reads; a grid is at most 81 digits plus separators
GRID_TRIES = 200  # full grids tried for one puzzle before the drawn blank count is declared out of reach
COUNT_NODE_LIMIT = 5_000  # solver nodes the validator may spend counting solutions of an unseen puzzle


def _option_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("sudoku_options", message.replace("{", "{{").replace("}", "}}"))


class SudokuOptions(TaskOptions):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    box_rows: int = Field(2, ge=1, description="rows in one box")
    box_cols: int = Field(2, ge=1, description="columns in one box; the grid side is box_rows * box_cols")
    unique: bool = Field(True, description="generated puzzles have exactly one solution")
    min_blanks: int = Field(4, ge=1, description="fewest blank cells in a generated puzzle")
    max_blanks: int = Field(12, ge=1, description="most blank cells in a generated puzzle")
    prompt_style: Literal["instruction", "grid"] = Field(
        "instruction", description="'instruction': one line naming the grid, then the rows; 'grid': the rows only")

    @field_validator("box_cols")
    @classmethod
    def _side(cls, value: int, info: ValidationInfo) -> int:
        rows = info.data.get("box_rows")
        if rows is not None and not 2 <= rows * value <= 9:
            side = rows * value
            raise _option_error(f"box_rows x box_cols = {rows}x{value} makes a {side}x{side} grid; the side must be "
                             f"2..9 so that cells are the digits 1..n (e.g. 2x2, 2x3, 3x3)")
        return value

    @field_validator("max_blanks")
    @classmethod
    def _blanks(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_blanks")
        if low is not None and low > value:
            raise _option_error(f"min_blanks ({low}) must not exceed max_blanks ({value})")
        rows, cols = info.data.get("box_rows"), info.data.get("box_cols")
        if rows is None or cols is None:
            return value
        side = rows * cols
        if value >= side * side:
            raise _option_error(f"max_blanks ({value}) must be below the {side * side} cells of a {side}x{side} grid")
        fewest = MIN_GIVENS.get(side)
        if info.data.get("unique", True) is not False and fewest and value > side * side - fewest:
            raise _option_error(f"max_blanks ({value}): no {side}x{side} Sudoku with more than "
                             f"{side * side - fewest} blanks has a unique solution")
        return value


class Grid:
    """Geometry of one board shape (cells numbered row by row) and a bitmask backtracking solver."""

    _shapes: dict[tuple[int, int], Grid] = {}

    def __init__(self, box_rows: int, box_cols: int):
        self.box_rows, self.box_cols = box_rows, box_cols
        n = self.n = box_rows * box_cols
        self.size = n * n
        self.full = (1 << n) - 1
        self.row = [i // n for i in range(self.size)]
        self.col = [i % n for i in range(self.size)]
        self.box = [(self.row[i] // box_rows) * box_rows + self.col[i] // box_cols for i in range(self.size)]
        self.offsets = [self.row[i] * (n + 1) + self.col[i] for i in range(self.size)]
        rows = [[i for i in range(self.size) if self.row[i] == k] for k in range(n)]
        cols = [[i for i in range(self.size) if self.col[i] == k] for k in range(n)]
        boxes = [[i for i in range(self.size) if self.box[i] == k] for k in range(n)]
        self.units = [("row", k + 1, cells) for k, cells in enumerate(rows)] + \
                     [("column", k + 1, cells) for k, cells in enumerate(cols)] + \
                     [("box", k + 1, cells) for k, cells in enumerate(boxes)]
        self.peers = [tuple(sorted(set(rows[self.row[i]] + cols[self.col[i]] + boxes[self.box[i]]) - {i}))
                      for i in range(self.size)]
        self._count = [bin(mask).count("1") for mask in range(1 << n)]
        self._digits = [tuple(d + 1 for d in range(n) if mask >> d & 1) for mask in range(1 << n)]

    @classmethod
    def of(cls, box_rows: int, box_cols: int) -> Grid:
        key = (box_rows, box_cols)
        if key not in cls._shapes:
            cls._shapes[key] = cls(box_rows, box_cols)
        return cls._shapes[key]

    # ------------------------------------------------------------------------------------------------ solving
    def solve(self, values: list[int], limit: int = 2, rng: random.Random | None = None,
              node_limit: int | None = None) -> list[list[int]] | None:
        """Up to `limit` solutions of `values` (0 = blank), trying the most constrained cell first; `rng`
        shuffles the digit order (random full grids). None when `node_limit` search nodes did not settle it."""
        n, full, count_of, digits_of = self.n, self.full, self._count, self._digits
        row_of, col_of, box_of = self.row, self.col, self.box
        rows, cols, boxes = [0] * n, [0] * n, [0] * n
        grid = list(values)
        for i, v in enumerate(grid):
            if v:
                bit = 1 << (v - 1)
                r, c, b = row_of[i], col_of[i], box_of[i]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return []
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
        blanks = [i for i, v in enumerate(grid) if not v]
        total = len(blanks)
        solutions: list[list[int]] = []
        budget = [node_limit if node_limit is not None else -1, False]  # nodes left, ran out

        def search(depth: int) -> bool:  # True: stop (enough solutions, or out of budget)
            if depth == total:
                solutions.append(list(grid))
                return len(solutions) >= limit
            if budget[0] == 0:
                budget[1] = True
                return True
            budget[0] -= 1
            best, best_count, best_mask = depth, n + 1, 0
            for j in range(depth, total):
                i = blanks[j]
                mask = full & ~(rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]])
                count = count_of[mask]
                if count < best_count:
                    best, best_count, best_mask = j, count, mask
                    if count <= 1:
                        break
            if best_count == 0:
                return False
            blanks[depth], blanks[best] = blanks[best], blanks[depth]
            cell = blanks[depth]
            r, c, b = row_of[cell], col_of[cell], box_of[cell]
            digits = digits_of[best_mask]
            if rng is not None and best_count > 1:
                digits = list(digits)
                rng.shuffle(digits)
            for d in digits:
                bit = 1 << (d - 1)
                grid[cell] = d
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                stop = search(depth + 1)
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
                if stop:
                    grid[cell] = 0
                    return True
            grid[cell] = 0
            return False

        search(0)
        if budget[1] and len(solutions) < limit:
            return None
        return solutions

    def count_solutions(self, values: list[int], limit: int = 2, node_limit: int | None = None) -> int | None:
        found = self.solve(values, limit=limit, node_limit=node_limit)
        return None if found is None else len(found)

    # ------------------------------------------------------------------------------------------------- rules
    def duplicates(self, values: list[int]) -> tuple[set[int], tuple[str, int, int] | None]:
        """Cells whose digit (1..n) repeats in a row, column or box, and the first such (unit, number, digit)."""
        bad: set[int] = set()
        first = None
        n = self.n
        for kind, number, cells in self.units:
            seen: dict[int, int] = {}
            for cell in cells:
                v = values[cell]
                if 1 <= v <= n:
                    if v in seen:
                        bad.add(cell)
                        bad.add(seen[v])
                        if first is None:
                            first = (kind, number, v)
                    else:
                        seen[v] = cell
        return bad, first

    def is_solution(self, values: list[int]) -> bool:
        return len(values) == self.size and all(1 <= v <= self.n for v in values) and not self.duplicates(values)[0]

    def layout(self, values: list[int] | str) -> str:
        """One row per line, digits only."""
        text = "".join(str(v) for v in values)
        return "\n".join(text[r * self.n:(r + 1) * self.n] for r in range(self.n))

    def offset(self, cell: int) -> int:
        """Character offset of `cell` in the one-row-per-line layout."""
        return self.offsets[cell]

    def where(self, cell: int) -> str:
        return f"r{self.row[cell] + 1}c{self.col[cell] + 1}"

    # ------------------------------------------------------------------------------------------- generating
    def random_full(self, rng: random.Random) -> list[int]:
        return self.solve([0] * self.size, limit=1, rng=rng)[0]

    def make_puzzle(self, rng: random.Random, blanks: int, unique: bool) -> tuple[list[int], list[int]] | None:
        """(puzzle, solution) with exactly `blanks` blanks, or None when this grid and removal order cannot reach
        that count uniquely. Cells are tried once each in random order: a removal that would admit a second
        solution is undone (more blanks never restore uniqueness, so one pass finds all it can)."""
        solution = self.random_full(rng)
        puzzle = list(solution)
        order = list(range(self.size))
        rng.shuffle(order)
        removed = 0
        for cell in order:
            if removed == blanks:
                break
            kept = puzzle[cell]
            puzzle[cell] = 0
            # Two solutions differ on at least 4 cells, so the first 3 removals never break uniqueness.
            if unique and removed >= 3 and self.count_solutions(puzzle, 2) != 1:
                puzzle[cell] = kept
            else:
                removed += 1
        return (puzzle, solution) if removed == blanks else None


@lru_cache(maxsize=8192)
def _analyse(box_rows: int, box_cols: int, puzzle: str, node_limit: int | None) -> tuple[int | None, str | None]:
    """(number of solutions capped at 2 or None when over budget, first solution found) of a puzzle string."""
    grid = Grid.of(box_rows, box_cols)
    found = grid.solve([int(c) for c in puzzle], limit=2, node_limit=node_limit)
    if found is None:
        return None, None
    return len(found), ("".join(map(str, found[0])) if found else None)


# ------------------------------------------------------------------------------------------- reading answers
_SEP = r"[ \t\r\f\v|+\-,;.\[\](){}'\"`*=#~\u2500-\u257f]"
_SEP_ALL = re.compile(r"(?:\s|" + _SEP + r")+")
_NOT_DIGIT = re.compile(r"[^0-9]+")


@lru_cache(maxsize=16)
def _patterns(n: int) -> tuple[re.Pattern, re.Pattern]:
    line = rf"{_SEP}*(?:[0-9]{_SEP}*){{{n}}}"
    by_rows = re.compile(rf"(?m)^{line}(?:\n(?:{_SEP}*\n)*{line}){{{n - 1}}}$")
    run = re.compile(rf"(?<![0-9])[0-9]{{{n * n}}}")
    return by_rows, run


def read_grid(text: str, n: int) -> tuple[str | None, int]:
    """The first n*n cells of an answer and how many digits were found. Tried in order: n lines of n digits each
    (separators and separator-only lines allowed), then the first unbroken run of n*n digits once separators are
    dropped (so '4x4' in a preamble is not read as cells), then simply the first n*n digits."""
    window = text[:MAX_SCAN]
    by_rows, run = _patterns(n)
    match = by_rows.search(window)
    if match:
        return _NOT_DIGIT.sub("", match.group()), n * n
    compact = _SEP_ALL.sub("", window)
    match = run.search(compact)
    if match:
        return match.group(), n * n
    digits = _NOT_DIGIT.sub("", compact)
    if len(digits) >= n * n:
        return digits[:n * n], n * n
    return None, len(digits)


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


def _column(row: dict[str, Any], mapped: str | None, candidates: tuple[str, ...], field: str) -> Any:
    if mapped is not None:
        if mapped not in row:
            raise RowError(f"missing column '{mapped}' (mapped to {field}); columns: {', '.join(map(str, row))}")
        return row[mapped]
    for name in candidates:
        if row.get(name) not in (None, ""):
            return row[name]
    return None


# ---------------------------------------------------------------------------------------------------- task
@register_task
class SudokuTask(Task):
    name = "sudoku"
    Options = SudokuOptions
    description = "Fill the grid so every row, column and box holds each digit 1..n once."
    column_fields = ("puzzle", "solution")

    @property
    def grid(self) -> Grid:
        return Grid.of(self.options.box_rows, self.options.box_cols)

    def _grid_of(self, example: dict[str, Any]) -> Grid:
        rows, cols = example.get("box_rows"), example.get("box_cols")
        if isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1 and 2 <= rows * cols <= 9:
            return Grid.of(rows, cols)
        return self.grid

    def default_size(self, split: str) -> int:
        return 20_000 if split == "train" else 500

    # ------------------------------------------------------------------------------------------------- data
    def generate(self, size: int, seed: int) -> list[dict[str, Any]]:
        options, grid = self.options, self.grid
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
            examples.append(self._example(puzzle, solution, n_solutions))
        return examples

    def _example(self, puzzle: list[int], solution: list[int] | None, n_solutions: int | None) -> dict[str, Any]:
        return {"puzzle": "".join(map(str, puzzle)),
                "solution": "".join(map(str, solution)) if solution is not None else None,
                "box_rows": self.options.box_rows, "box_cols": self.options.box_cols,
                "n_blanks": puzzle.count(0), "n_solutions": n_solutions}

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        grid = self.grid
        raw = _column(row, columns.get("puzzle"), PUZZLE_COLUMNS, "puzzle")
        if raw is None:
            raise RowError(f"no puzzle column with a value (looked for {', '.join(PUZZLE_COLUMNS)}); map one with "
                           f"columns: {{puzzle: NAME}}")
        puzzle = parse_cells(raw, grid, "puzzle")
        _, clash = grid.duplicates(puzzle)
        if clash:
            kind, number, digit = clash
            raise RowError(f"givens break a rule: {kind} {number} repeats {digit}")
        raw_solution = _column(row, columns.get("solution"), SOLUTION_COLUMNS, "solution")
        solution = None
        if raw_solution not in (None, ""):
            solution = parse_cells(raw_solution, grid, "solution", blanks_allowed=False)
            _, clash = grid.duplicates(solution)
            if clash:
                kind, number, digit = clash
                raise RowError(f"solution is not a valid grid: {kind} {number} repeats {digit}")
            changed = next((i for i, (p, s) in enumerate(zip(puzzle, solution)) if p and p != s), None)
            if changed is not None:
                raise RowError(f"solution does not match the given at {grid.where(changed)}")
        n_solutions = None
        if grid.size <= 36 or solution is None:
            n_solutions = grid.count_solutions(puzzle, 2)
            if n_solutions == 0:
                raise RowError("the puzzle has no solution")
        else:
            claimed = row.get("n_solutions")
            if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > 0:
                n_solutions = claimed
        return self._example(puzzle, solution, n_solutions)

    # ----------------------------------------------------------------------------------------------- format
    def prompt(self, example: dict[str, Any]) -> str:
        grid = self._grid_of(example)
        rows = grid.layout(example["puzzle"])
        if self.options.prompt_style == "grid":
            return rows
        return f"Solve this {grid.n}x{grid.n} Sudoku ({grid.box_rows}x{grid.box_cols} boxes, 0 = blank):\n{rows}"

    def target(self, example: dict[str, Any]) -> str:
        grid = self._grid_of(example)
        solution = example.get("solution")
        if not solution:
            solution = _analyse(grid.box_rows, grid.box_cols, example["puzzle"], None)[1]
            if solution is None:
                raise RowError(f"puzzle {example['puzzle']} has no solution")
        return grid.layout(solution)

    def key(self, example: dict[str, Any]) -> str:
        return example["puzzle"]

    # ---------------------------------------------------------------------------------------------- judging
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            text = output_text if isinstance(output_text, str) else ("" if output_text is None else str(output_text))
            return self._judge(example, text)
        except Exception as exc:  # the validator never raises, whatever it is given
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})", {})

    def _reference(self, example: dict[str, Any], grid: Grid) -> str | None:
        """The solution when the puzzle has exactly one, else None (several, or too costly to count)."""
        known = example.get("n_solutions")
        if known == 1 and example.get("solution"):
            return example["solution"]
        if isinstance(known, int) and known > 1:
            return None
        count, first = _analyse(grid.box_rows, grid.box_cols, example["puzzle"], COUNT_NODE_LIMIT)
        return first if count == 1 else None

    def _judge(self, example: dict[str, Any], text: str) -> Verdict:
        grid = self._grid_of(example)
        n = grid.n
        puzzle = [ord(c) - 48 for c in example["puzzle"]]
        cells, found = read_grid(text, n)
        if cells is None:
            return Verdict(False, False, 0.0, f"expected {grid.size} digits, found {found}",
                           {"cells_parsed": found})
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
        reference = self._reference(example, grid)
        if reference is not None:
            right = sum(values[i] == ord(reference[i]) - 48 for i in blanks)
        else:  # several solutions: credit blanks that break no rule and clash with no given
            right = sum(1 <= values[i] <= n and i not in conflicts and all(puzzle[j] != values[i]
                                                                           for j in grid.peers[i])
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

    def pinned(self, example: dict[str, Any]) -> dict[int, str]:
        grid = self._grid_of(example)
        return {grid.offsets[i]: c for i, c in enumerate(example["puzzle"]) if c != "0"}

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Offsets of cells in a full-length draft (target layout, cell at row*(n+1)+col) that change a given,
        are not a digit 1..n, or repeat a digit in a row, column or box. Givens that still hold their digit are
        never reported: they are right by definition."""
        try:
            grid = self._grid_of(example)
            text = partial_text if isinstance(partial_text, str) else ""
            puzzle = example["puzzle"]
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
        except Exception:  # a draft can be anything; a hook must never break sampling
            return []
