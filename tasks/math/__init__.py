"""Math: word problems with a numeric final answer (GSM8K style) and countdown puzzles.

Two kinds of example share the task; each example carries its own `kind`:

- ``word``: a question whose answer is a worked solution ending in ``#### N``. Data: generated multi-step
  integer arithmetic problems (`family: arithmetic`, `arithmetic.py`), GSM8K-style rows from files or the Hub
  (`rows.py`). Judged by the final answer only (`word_judge.py`): ``#### N``, else ``\\boxed{...}``, else the
  last number in the text (`answers.py`). A rational reference answer is compared exactly (`exact.py`: the
  answer may be a number or small LaTeX arithmetic such as ``\\frac{36}{2}``); a non-rational one
  (``\\sqrt{2}``) with math-verify (`verify.py`).
- ``countdown``: given numbers and a target, make the target with + - * / and parentheses, using each number
  exactly once (option `number_use: at_most_once`: some may be left out). The answer is an expression
  (``79-(44-15)``) or a step trace (``44-15=29,79-29=50``). Data: generated (`family: countdown`; the target is
  built from a random expression of the numbers, so every puzzle is solvable) or rows with numbers, a target
  and a reference, else one found by search (`countdown_puzzles.py`). Judged exactly with fractions, an
  expression parsed with `ast` (never evaluated as Python), a trace step by step (`countdown.py`).

Example fields: `kind`, `question`, `answer` (worked solution ending ``#### N``; None for countdown), `final`
(the final answer: ``"18"`` for a word problem, the reference expression or trace for countdown), `numbers` and
`target_value` (countdown only; None for word problems).
"""

from dgemma_ft.tasks.math.answers import final_from_answer
from dgemma_ft.tasks.math.countdown import (Rejected, check_answer, check_expression, check_trace, judge_countdown,
                                            read_answer)
from dgemma_ft.tasks.math.countdown_puzzles import make_countdown, solve_countdown
from dgemma_ft.tasks.math.exact import IRRATIONAL, exact_value
from dgemma_ft.tasks.math.options import MathOptions
from dgemma_ft.tasks.math.task import MathTask
from dgemma_ft.tasks.math.verify import math_verify_equal, warm_up
from dgemma_ft.tasks.math.word_judge import compare_answers, judge_word

__all__ = ["IRRATIONAL", "MathOptions", "MathTask", "Rejected", "check_answer", "check_expression", "check_trace",
           "compare_answers", "exact_value", "final_from_answer", "judge_countdown", "judge_word", "make_countdown",
           "math_verify_equal", "read_answer", "solve_countdown", "warm_up"]
