"""The json task's options (`task.options` in a recipe): the shape of generated schemas, how the prompt prints
them, and whether judging also compares with a row's reference."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from dgemma_ft.tasks.base import TaskOptions, check_order


class JsonSchemaOptions(TaskOptions):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    max_depth: int = Field(2, ge=0, le=4, description="container levels below the root object in generated "
                                                       "schemas: 0 flat, 1 objects/lists, 2 lists of objects")
    min_properties: int = Field(2, ge=1, le=8, description="fewest top-level properties in a generated schema")
    max_properties: int = Field(5, ge=1, le=8, description="most top-level properties in a generated schema")
    formats: bool = Field(True, description="generated date/email strings carry `format` (checked when judging)")
    compact_schema: bool = Field(True, description="print the schema in the prompt without spaces after , and :")
    max_prompt_chars: int | None = Field(400, ge=120, description="generated prompts stay within this many "
                                                                  "characters (properties are dropped or the "
                                                                  "schema redrawn); None: no limit")
    shuffle_facts: bool = Field(False, description="state generated facts in random order instead of schema order")
    match_reference: bool = Field(True, description="`correct` also needs the answer to equal the reference when "
                                                    "a row has one; turn off for sets whose prompts do not state "
                                                    "the values")
    vocabulary: Literal["builtin", "train", "heldout"] = Field(
        "builtin", description="property names and string values of generated schemas: the builtin vocabulary, "
                               "or invented words from one of two disjoint halves (train / heldout) for "
                               "evaluating on names and values never seen in training")

    @field_validator("max_properties")
    @classmethod
    def _properties(cls, value: int, info: ValidationInfo) -> int:
        check_order("json", "min_properties", info.data.get("min_properties"), "max_properties", value)
        return value
