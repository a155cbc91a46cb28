"""task.train.options / task.eval.options: a source's own task options over task.options. Generated training
data can come from one half of the JSON vocabulary and the evaluation from the other; a Countdown recipe can train
on 3 and 4 numbers and evaluate on 3. Bad options are one line naming the source's key."""

import json
from pathlib import Path

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe, source_options
from dgemma_ft.finetune.run import build_task_data
from dgemma_ft.tasks.json import schema_of

ROOT = Path(__file__).resolve().parent.parent


def _recipe(tmp_path, task_text: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"finetune: full\ntask:\n{task_text}train: {{output_dir: {tmp_path / 'run'}}}\n", encoding="utf-8")
    return path


def _names(schema: dict) -> set[str]:
    names = set()
    for name, sub in (schema.get("properties") or {}).items():
        names.add(name)
        names |= _names(sub)
        names |= _names(sub.get("items") or {})
    return names


def test_json_trains_on_one_vocabulary_half_and_evaluates_on_the_other(tmp_path):
    path = _recipe(tmp_path, """\
  name: json
  options: {max_depth: 1, min_properties: 2, max_properties: 3}
  train: {source: generate, size: 300, seed: 0, options: {vocabulary: train}}
  eval: {source: generate, size: 100, seed: 9, options: {vocabulary: heldout}}
""")
    data = build_task_data(load_recipe(path))
    train_names = set().union(*(_names(schema_of(row)) for row in data.train))
    eval_names = set().union(*(_names(schema_of(row)) for row in data.eval))
    assert len(train_names) > 100 and len(eval_names) > 50
    assert not train_names & eval_names
    assert data.task.options.vocabulary == "train"


def test_countdown_evaluates_on_three_numbers_while_training_on_three_and_four(tmp_path):
    path = _recipe(tmp_path, """\
  name: math
  options: {family: countdown, min_numbers: 3, max_numbers: 4}
  train: {source: generate, size: 200, seed: 0}
  eval: {source: generate, size: 50, seed: 9, options: {min_numbers: 3, max_numbers: 3}}
""")
    recipe = load_recipe(path)
    data = build_task_data(recipe)
    assert {len(row["numbers"]) for row in data.eval} == {3}
    assert {len(row["numbers"]) for row in data.train} == {3, 4}
    assert source_options(recipe, "eval").max_numbers == 3 and source_options(recipe, "train").max_numbers == 4


def test_bad_source_options_name_the_key_and_line(tmp_path):
    path = _recipe(tmp_path, """\
  name: json
  train: {source: generate, size: 10}
  eval: {source: generate, size: 10, options: {vocabulary: secret}}
""")
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "r.yaml:5" in message and "task.eval.options.vocabulary" in message and "\n" not in message

    path = _recipe(tmp_path, """\
  name: math
  options: {family: countdown, min_numbers: 4, max_numbers: 4}
  train: {source: generate, size: 10, options: {max_numbers: 3}}
""")
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert "task.train.options" in str(caught.value) and "min_numbers" in str(caught.value)


def test_train_also_mixes_sources_each_with_its_own_options(tmp_path):
    path = _recipe(tmp_path, """\
  name: sudoku
  options: {box_rows: 2, box_cols: 3, min_blanks: 4, max_blanks: 10, prompt_style: grid}
  train: {source: generate, size: 60, seed: 1}
  train_also:
    - {source: generate, size: 20, seed: 2, options: {box_cols: 2, max_blanks: 8}}
  eval: {source: generate, size: 10, seed: 9}
""")
    recipe = load_recipe(path)
    data = build_task_data(recipe)
    widths = [len(row["messages"][-1]["content"].splitlines()[0]) for row in data.train]
    assert len(data.train) == 80 and widths.count(6) == 60 and widths.count(4) == 20
    eval_prompts = {row["messages"][0]["content"] for row in data.eval}
    assert not eval_prompts & {row["messages"][0]["content"] for row in data.train}


def test_bad_train_also_options_name_the_entry(tmp_path):
    path = _recipe(tmp_path, """\
  name: sudoku
  train: {source: generate, size: 10}
  train_also:
    - {source: generate, size: 10, options: {box_colz: 2}}
""")
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert "r.yaml:6" in str(caught.value) and "task.train_also[0].options" in str(caught.value)


def test_the_recipes_evaluation_judges_its_own_source_with_its_options(tmp_path):
    """json-tiny trains on one vocabulary half; its evaluation (after training, and `eval RUN`) reads and judges
    the heldout half."""
    from dgemma_ft.finetune.run import train
    from dgemma_ft.inference.run_eval import run_evaluation
    from dgemma_ft.tasks.json.lexicon import is_heldout
    from cli_helpers import SMALL_MODEL

    run = train(load_recipe(ROOT / "recipes" / "json-tiny.yaml", [
        *SMALL_MODEL, "task.train.size=16", "task.eval.size=3", "train.steps=1", "train.warmup_steps=0",
        "train.batch_size=2", "train.threads=1", f"train.output_dir={tmp_path / 'run'}"]))
    report = run_evaluation(run, steps=[1], out_dir=tmp_path / "eval")
    predictions = [json.loads(line) for line in (report.folder / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3
    for row in predictions:
        schema = json.loads(row["prompt"].split("Schema: ", 1)[1].split("\n", 1)[0])
        assert all(is_heldout(word) for name in _names(schema) for word in name.split("_"))
