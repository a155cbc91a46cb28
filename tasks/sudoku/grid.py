"""Board geometry of one box shape (cells numbered row by row), a bitmask backtracking solver that counts
solutions within a node budget, the rules a filled grid must keep, and puzzle making by removal."""

from __future__ import annotations

import random
from functools import lru_cache


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
def analyse_puzzle(box_rows: int, box_cols: int, puzzle: str,
                   node_limit: int | None) -> tuple[int | None, str | None]:
    """(number of solutions capped at 2 or None when over budget, first solution found) of a puzzle string;
    cached because the validator asks again for every answer to the same puzzle."""
    grid = Grid.of(box_rows, box_cols)
    found = grid.solve([int(c) for c in puzzle], limit=2, node_limit=node_limit)
    if found is None:
        return None, None
    return len(found), ("".join(map(str, found[0])) if found else None)
