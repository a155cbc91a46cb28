"""`model.canvas_length` overrides the checkpoint's canvas: training, the saved config, an adapter run loaded for
evaluation, `check` and the sampler all use the recipe's length (a 6x6 answer in one canvas instead of two)."""

import json
from pathlib import Path

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.check import check_recipe
from dgemma_ft.finetune.estimate import estimate
from dgemma_ft.finetune.model_loading import load_model
from dgemma_ft.finetune.recipe import ModelSection, load_recipe
from dgemma_ft.finetune.run import train
from dgemma_ft.inference.run_eval import run_evaluation
from cli_helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parent.parent
BASE = [*SMALL_MODEL, "task.train.size=32", "task.exclude_sources=[]", "train.batch_size=4", "train.warmup_steps=1",
        "train.threads=1", "train.steps=2", "train.log_every=1", "eval.after_train=false"]


def lora_overrides(base: Path, out: Path) -> list[str]:
    """The shipped 6x6 adapter recipe, shrunk to seconds, at canvas 48 on a base saved at 40."""
    return [f"model.name={base}", "model.canvas_length=48", "task.train.size=16", "task.train_also=[]",
            "task.eval.size=3", "lora.r=4", "lora.alpha=8", "train.steps=2", "train.warmup_steps=1",
            "train.batch_size=4", "train.threads=1", "train.log_every=1", f"train.output_dir={out}",
            "eval.steps=[2]", "eval.batch_size=8", "eval.base=false", "eval.also=[]"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A full run on the tiny model (canvas 24) retrained at canvas 40."""
    out = tmp_path_factory.mktemp("canvas") / "base"
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml",
                         [*BASE, "model.canvas_length=40", f"train.output_dir={out}"])
    return train(recipe)


def test_full_run_saves_and_reloads_the_recipes_canvas(base_run):
    assert json.loads((base_run / "model" / "config.json").read_text())["canvas_length"] == 40
    assert load_model(ModelSection(name=str(base_run), dtype="float32")).model.config.canvas_length == 40


def test_adapter_run_trains_checks_and_evaluates_at_its_canvas(base_run, tmp_path):
    recipe_path, overrides = ROOT / "recipes" / "sudoku-6x6-lora-tiny.yaml", lora_overrides(base_run, tmp_path / "run")
    lines = check_recipe(recipe_path, overrides)
    assert any("canvases of 48" in line for line in lines), lines
    run = train(load_recipe(recipe_path, overrides))
    assert (run / "adapter").is_dir()
    # the evaluation loads the base (canvas 40 in its config) through the run's recipe, which says 48
    assert load_model(ModelSection(name=str(run), dtype="float32"), merge_adapter=False).model.config.canvas_length == 48
    report = run_evaluation(run)
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and report is not None
    # a 6x6 answer (41 characters) fits one 48-token canvas: the sampler decodes one block, not two of 40
    assert all(row["stats"]["blocks"] == 1 for row in rows)


def test_adapter_without_override_keeps_the_bases_canvas(base_run):
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [f"model.name={base_run}", "finetune=lora"])
    assert recipe.model.canvas_length is None
    assert load_model(recipe.model).model.config.canvas_length == 40


@pytest.mark.parametrize("value", ["0", "-8", "9000", "true"])
def test_bad_canvas_length_is_one_line_naming_the_field(value):
    with pytest.raises(UserError) as caught:
        load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [f"model.canvas_length={value}"])
    message = str(caught.value)
    assert "model.canvas_length" in message and "\n" not in message


def test_estimate_plans_the_recipes_canvas():
    """`estimate` reads no weights, but plans the step at the recipe's canvas, as training will run it."""
    released = estimate(load_recipe(ROOT / "recipes" / "sudoku.yaml", []))
    shorter = estimate(load_recipe(ROOT / "recipes" / "sudoku.yaml", ["model.canvas_length=128"]))
    assert released.step.canvas == 256 and shorter.step.canvas == 128
    assert shorter.step.encoder_length == released.step.encoder_length - 128
