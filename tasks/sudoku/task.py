"""The Sudoku task as the trainer and evaluator see it: prompt and target text, judging that never raises, and
the sampler hooks (givens pinned, rule-breaking cells renoised). The work is done in the sibling modules."""

from __future__ import annotations

from typing import Any

from dgemma_ft.tasks.base import RowError, Task, Verdict, register_task
from dgemma_ft.tasks.sudoku.examples import example_from_row, generate_examples
from dgemma_ft.tasks.sudoku.grid import Grid, analyse_puzzle
from dgemma_ft.tasks.sudoku.judging import draft_violations, judge
from dgemma_ft.tasks.sudoku.options import SudokuOptions


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
        return generate_examples(self.grid, self.options, size, seed)

    def from_row(self, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
        return example_from_row(row, columns, self.grid)

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
            solution = analyse_puzzle(grid.box_rows, grid.box_cols, example["puzzle"], None)[1]
            if solution is None:
                raise RowError(f"puzzle {example['puzzle']} has no solution")
        return grid.layout(solution)

    def key(self, example: dict[str, Any]) -> str:
        return example["puzzle"]

    # ---------------------------------------------------------------------------------------------- judging
    def validate(self, example: dict[str, Any], output_text: str) -> Verdict:
        try:
            text = output_text if isinstance(output_text, str) else ("" if output_text is None else str(output_text))
            return judge(example, text, self._grid_of(example))
        except Exception as exc:  # the validator never raises, whatever it is given
            return Verdict(False, False, 0.0, f"could not judge the answer ({type(exc).__name__})", {})

    def pinned(self, example: dict[str, Any]) -> dict[int, str]:
        grid = self._grid_of(example)
        pins = {grid.offsets[i]: c for i, c in enumerate(example["puzzle"]) if c != "0"}
        if self.options.pin_layout:  # the answer is `grid.layout`: n rows of n digits joined by line breaks
            pins.update({row * (grid.n + 1) + grid.n: "\n" for row in range(grid.n - 1)})
        return pins

    def violations(self, example: dict[str, Any], partial_text: str) -> list[int]:
        """Offsets of the draft's cells that change a given, are not a digit 1..n, or repeat a digit in a row,
        column or box (see `judging.draft_violations`)."""
        try:
            text = partial_text if isinstance(partial_text, str) else ""
            return draft_violations(example["puzzle"], text, self._grid_of(example))
        except Exception:  # a draft can be anything; a hook must never break sampling
            return []
