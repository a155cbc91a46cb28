"""Sudoku with any box shape: 2x2 boxes make a 4x4 grid, 2x3 a 6x6, 3x3 a 9x9 (at most 9x9, so cells are digits).

Data: puzzles generated with a unique solution (a bitmask backtracking solver checks uniqueness while cells are
removed), or puzzle strings read from files and Hub datasets ('0', '.', '_' or any other non-digit marks a blank).
Prompt: one line of instructions and the grid, one row per line. Target: the solved grid, one row per line.
A solve is any complete valid grid that keeps every given; it need not equal a stored solution, because some
public puzzles have several.

Modules: `options` (task.options), `grid` (board geometry, solver, puzzle making), `examples` (generated and
source-row examples), `answers` (reading a model's grid), `judging` (verdicts and draft violations), `task`.
"""

from dgemma_ft.tasks.sudoku.answers import read_grid
from dgemma_ft.tasks.sudoku.examples import PUZZLE_COLUMNS, SOLUTION_COLUMNS, parse_cells
from dgemma_ft.tasks.sudoku.grid import Grid
from dgemma_ft.tasks.sudoku.options import MIN_GIVENS, SudokuOptions
from dgemma_ft.tasks.sudoku.task import SudokuTask

__all__ = ["MIN_GIVENS", "PUZZLE_COLUMNS", "SOLUTION_COLUMNS", "Grid", "SudokuOptions", "SudokuTask", "parse_cells",
           "read_grid"]
