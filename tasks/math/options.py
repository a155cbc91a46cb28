"""The math task's options (the recipe's `task.options`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dgemma_ft.tasks.base import TaskOptions, check_order


class MathOptions(TaskOptions):
    family: Literal["arithmetic", "countdown"] = Field(
        "arithmetic", description="what `generate` makes; rows loaded from files decide their own kind")
    min_steps: int = Field(1, ge=1, le=8, description="arithmetic: fewest operations in a problem")
    max_steps: int = Field(3, ge=1, le=8, description="arithmetic: most operations in a problem")
    max_operand: int = Field(20, ge=2, le=10_000, description="largest number a problem states")
    min_numbers: int = Field(3, ge=2, le=6, description="countdown: fewest numbers given")
    max_numbers: int = Field(4, ge=2, le=6, description="countdown: most numbers given")
    max_target: int = Field(100, ge=1, le=1_000_000, description="countdown: largest target")
    number_use: Literal["exactly_once", "at_most_once"] = Field(
        "exactly_once", description="countdown: every number used exactly once (as d1 and Dream require), or each "
                                    "at most once (some may be left out)")
    worked_solution: bool = Field(True, description="word targets include the worked steps before '#### N'")
    solution_style: Literal["sentences", "equations"] = Field(
        "sentences", description="arithmetic: each worked step as a sentence ('Mia has 12 + 7 = 19 shells.') or "
                                 "as the bare equation ('12 + 7 = 19'; a third of the tokens, for small models)")
    prompt_style: Literal["instruction", "compact"] = Field(
        "instruction", description="countdown: a sentence with the rule and the answer form, or only the numbers "
                                   "and the target ('19 2 9 -> 30'); word problems: the question with or without "
                                   "the '#### <number>' instruction line (for small models, as sudoku's grid)")

    @model_validator(mode="after")
    def _check(self) -> MathOptions:
        check_order("math", "min_steps", self.min_steps, "max_steps", self.max_steps)
        check_order("math", "min_numbers", self.min_numbers, "max_numbers", self.max_numbers)
        return self
