"""The Sudoku task's options (`task.options` of a recipe): box shape, blank range, uniqueness, prompt style.
Impossible combinations (a side above 9, more blanks than a unique puzzle can have) fail when the recipe loads."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from dgemma_ft.tasks.base import TaskOptions, check_order, option_error

# The fewest givens a uniquely solvable grid of each side can have (more blanks can never be unique).
MIN_GIVENS = {4: 4, 6: 8, 9: 17}


class SudokuOptions(TaskOptions):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    box_rows: int = Field(2, ge=1, description="rows in one box")
    box_cols: int = Field(2, ge=1, description="columns in one box; the grid side is box_rows * box_cols")
    unique: bool = Field(True, description="generated puzzles have exactly one solution")
    min_blanks: int = Field(4, ge=1, description="fewest blank cells in a generated puzzle")
    max_blanks: int = Field(12, ge=1, description="most blank cells in a generated puzzle")
    prompt_style: Literal["instruction", "grid"] = Field(
        "instruction", description="'instruction': one line naming the grid, then the rows; 'grid': the rows only")
    pin_layout: bool = Field(False, description="also pin the line breaks between the answer's rows (its layout "
                                                "is known in advance, like the givens)")

    @field_validator("box_cols")
    @classmethod
    def _side(cls, value: int, info: ValidationInfo) -> int:
        rows = info.data.get("box_rows")
        if rows is not None and not 2 <= rows * value <= 9:
            side = rows * value
            raise option_error("sudoku", f"box_rows x box_cols = {rows}x{value} makes a {side}x{side} grid; the "
                                         f"side must be 2..9 so that cells are the digits 1..n (e.g. 2x2, 2x3, 3x3)")
        return value

    @field_validator("max_blanks")
    @classmethod
    def _blanks(cls, value: int, info: ValidationInfo) -> int:
        check_order("sudoku", "min_blanks", info.data.get("min_blanks"), "max_blanks", value)
        rows, cols = info.data.get("box_rows"), info.data.get("box_cols")
        if rows is None or cols is None:
            return value
        side = rows * cols
        if value >= side * side:
            raise option_error("sudoku", f"max_blanks ({value}) must be below the {side * side} cells of a "
                                         f"{side}x{side} grid")
        fewest = MIN_GIVENS.get(side)
        if info.data.get("unique", True) is not False and fewest and value > side * side - fewest:
            raise option_error("sudoku", f"max_blanks ({value}): no {side}x{side} Sudoku with more than "
                                         f"{side * side - fewest} blanks has a unique solution")
        return value
