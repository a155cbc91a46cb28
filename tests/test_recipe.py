"""Recipes: the shipped ones validate, overrides apply, and malformed ones give one clear line each."""

from pathlib import Path

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
GOOD = """\
model:
  name: tiny
task:
  name: sudoku
  options: {min_blanks: 4, max_blanks: 8}
finetune: full
train:
  steps: 10
  warmup_steps: 2
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.task.name in {"sudoku", "json", "math"}


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path, ["train.lr=3e-4", "train.betas=[0.8, 0.9]", "eval.steps=[1, 4]",
                                "model.tiny.hidden_size=64", "train.output_dir=elsewhere"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.betas == (0.8, 0.9)
    assert recipe.eval.steps == [1, 4]
    assert recipe.model.tiny.hidden_size == 64
    assert recipe.train.output_dir == "elsewhere"


def test_override_syntax_errors():
    with pytest.raises(UserError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(UserError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


MALFORMED = [
    # (recipe text, substrings the one-line error must contain)
    (GOOD.replace("steps: 10", "stepz: 10"), ["train.stepz", "unknown key", "did you mean 'steps'", ":8"]),
    (GOOD.replace("  steps: 10", "  steps: ten"), ["train.steps", "valid integer", "'ten'"]),
    (GOOD + "  lr: 0\n", ["train.lr", "greater than 0"]),
    (GOOD + "  lr: -1e-3\n", ["train.lr", "greater than 0"]),
    (GOOD.replace("warmup_steps: 2", "warmup_steps: 10"), ["warmup_steps (10) must be fewer than steps (10)"]),
    (GOOD + "  min_lr: 1.0\n", ["min_lr (1.0) cannot exceed lr"]),
    (GOOD.replace("  name: sudoku\n", ""), ["task.name", "required but missing"]),
    ("model:\n  name: tiny\n", ["task", "required but missing"]),
    (GOOD.replace("finetune: full", "finetune: partial"), ["finetune", "'lora' or 'full'"]),
    (GOOD.replace("finetune: full", "finetune: lora"), ["LoRA on a freshly initialised tiny model"]),
    (GOOD + "  self_conditioning_p: 1.5\n", ["train.self_conditioning_p", "less than or equal to 1"]),
    (GOOD + "  block_selection: some\n", ["train.block_selection", "'random' or 'all'"]),
    (GOOD + "  betas: [0.9, 1.2]\n", ["train.betas", "in [0, 1)"]),
    (GOOD.replace("model:\n  name: tiny", "model:\n  name: tiny\n  dtype: float8"), ["model.dtype"]),
    (GOOD.replace("model:\n  name: tiny", "model:\n  name: tiny\n  tiny: {hidden_sise: 64}"),
     ["model.tiny.hidden_sise", "did you mean 'hidden_size'"]),
    (GOOD.replace("model:\n  name: tiny", "model:\n  name: tiny\n  tiny: {num_attention_heads: 3}"),
     ["num_attention_heads must be a multiple of num_key_value_heads"]),
    (GOOD + "lora:\n  targets: [q_proj, experts]\n", ["lora.targets", "choose from"]),
    (GOOD + "lora:\n  r: 0\n", ["lora.r", "greater than 0"]),
    (GOOD + "eval:\n  steps: []\n", ["eval.steps", "positive denoising step counts"]),
    (GOOD + "eval:\n  steps: [4, 0]\n", ["eval.steps", "positive denoising step counts"]),
    (GOOD.replace("finetune: full", "finetune: full\nmodel_extra: 1"), ["model_extra", "unknown key",
                                                                       "did you mean 'model'"]),
    (GOOD.replace("model:\n  name: tiny", "model:\n  name: tiny\n  load_in_4bit: true"),
     ["full training cannot update 4-bit weights"]),
    ("model:\n  name: tiny\n\tdtype: auto\n", ["not valid YAML", ":3", "'\\t'"]),
    ("- just\n- a list\n", ["a recipe is a mapping of sections"]),
    ("", ["the recipe is empty"]),
    (GOOD.replace("  options: {min_blanks: 4, max_blanks: 8}", "  train: {source: generate, size: -5}"),
     ["task.train.size", "greater than 0"]),
    (GOOD + "  canvas_samples: 0\n", ["train.canvas_samples", "greater than 0"]),
]


@pytest.mark.parametrize("text,expected", MALFORMED, ids=[f"malformed-{i}" for i in range(len(MALFORMED))])
def test_malformed_recipe_gives_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
