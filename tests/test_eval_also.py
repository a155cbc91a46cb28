"""eval.base and eval.also: the recipe's evaluation measures the base beside the adapter and extra data sets
(each with its own task options) in one command, writes each extra set to RUN/evals/NAME, sums them up in
RUN/eval/report.md, keeps their examples out of training, and `check` refuses bad entries with one line."""

import json
from pathlib import Path

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import build_task_data, train
from cli_helpers import SMALL_MODEL, run_cli

ROOT = Path(__file__).resolve().parent.parent
BASE = [*SMALL_MODEL, "task.train.size=32", "task.exclude_sources=[]", "train.batch_size=4", "train.warmup_steps=1",
        "train.threads=1", "train.steps=2", "train.log_every=1"]
# A 4x4 base adapted to 6x6; the adapter's evaluation also measures the 4x4 skill it must keep, base beside it.
LORA = """\
model: {{name: {base}, dtype: float32}}
task:
  name: sudoku
  options: {{box_rows: 2, box_cols: 3, min_blanks: 4, max_blanks: 8, prompt_style: grid}}
  train: {{source: generate, size: 16, seed: 1}}
  eval: {{source: generate, size: 3, seed: 7}}
finetune: lora
lora: {{r: 4, alpha: 8}}
train: {{steps: 2, warmup_steps: 1, batch_size: 4, threads: 1, log_every: 1, output_dir: {out}}}
eval:
  steps: [2]
  batch_size: 8
  base: true
  also:
    - {{name: four, source: sudoku4/dream_4x4.jsonl, options: {{box_cols: 2, box_rows: 2}}, limit: 8}}
"""


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("also") / "base"
    return train(load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [*BASE, f"train.output_dir={out}"]))


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    recipe = folder / "lora.yaml"
    recipe.write_text(LORA.format(base=base_run, out=folder / "run"), encoding="utf-8")
    return recipe, folder / "run"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_one_command_reports_adapter_and_base_on_both_sets(lora_run, capsys):
    recipe, run = lora_run
    code, out, err = run_cli([str(recipe)], capsys)
    assert code == 0, err
    main = _json(run / "eval" / "report.json")
    assert main["evaluation"]["scope"] == "full" and main["evaluation"]["base_compared"] is True
    assert [(r["model"], r["examples"]) for r in main["results"]] == [("adapter", 3), ("base", 3)]
    extra_folder = run / "evals" / "four"
    extra = _json(extra_folder / "report.json")
    assert extra["evaluation"]["scope"] == "also" and extra["evaluation"]["name"] == "four"
    assert extra["evaluation"]["options"] == {"box_cols": 2, "box_rows": 2}
    assert extra["data"] == "sudoku4/dream_4x4.jsonl" and extra["examples"] == 8
    assert [(r["model"], r["steps"], r["examples"]) for r in extra["results"]] == [("adapter", 2, 8), ("base", 2, 8)]
    # the main report's figures are the extra report's
    assert [(a["name"], a["model"], a["correct"], a["examples"], a["solve_rate"], a["report"]) for a in main["also"]] \
        == [("four", r["model"], r["correct"], 8, r["solve_rate"], "../evals/four/report.md") for r in extra["results"]]
    for name in ("report.md", "predictions.jsonl", "solve_rate_vs_steps.png", "trace.png"):
        assert (extra_folder / name).is_file(), name
    assert len((extra_folder / "predictions.jsonl").read_text().splitlines()) == 2 * 8
    predictions = [json.loads(line) for line in (extra_folder / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prompt"].count("\n") == 3 for p in predictions)  # 4x4 puzzles, under the 6x6 recipe
    markdown = (run / "eval" / "report.md").read_text()
    assert "## Also evaluated" in markdown and "[four](../evals/four/report.md)" in markdown
    assert "`sudoku4/dream_4x4.jsonl` (box_cols=2, box_rows=2) | adapter | 2 |" in markdown
    extra_md = (extra_folder / "report.md").read_text()
    assert "Extra evaluation `four`" in extra_md and "(../../eval/report.md)" in extra_md
    assert "eval.also 'four'" in out and "Traceback" not in out + err


def test_partial_evaluations_leave_the_extras_and_base_out(lora_run, capsys):
    recipe, run = lora_run
    if not (run / "adapter").is_dir():
        pytest.skip("the training test did not run")
    code, _, err = run_cli(["eval", str(run), "--limit", "2"], capsys)
    assert code == 0, err
    partial = _json(run / "evals" / "limit-2" / "report.json")
    assert "also" not in partial and {r["model"] for r in partial["results"]} == {"adapter"}
    assert not (run / "evals" / "limit-2" / "evals").exists()
    code, _, err = run_cli(["eval", str(run), "--limit", "2", "--base"], capsys)  # --base still adds the base
    assert code == 0, err
    assert {r["model"] for r in _json(run / "evals" / "limit-2" / "report.json")["results"]} == {"adapter", "base"}


def test_extra_sets_are_kept_out_of_training(tmp_path):
    options = "task.options={box_rows: 2, box_cols: 2, min_blanks: 4, max_blanks: 8}"
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml",
                         [*BASE, options, "task.train.size=40", "task.eval=null", f"train.output_dir={tmp_path}"])
    plain = build_task_data(recipe)
    taken = [row for row in plain.train][:5]
    extra = tmp_path / "taken.jsonl"
    extra.write_text("".join(json.dumps({"puzzle": r["puzzle"], "solution": r["solution"]}) + "\n" for r in taken))
    puzzles = {r["puzzle"] for r in taken}
    also = f"eval.also=[{{name: seen, source: {extra}, options: {{prompt_style: instruction}}}}]"
    kept_out = build_task_data(load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml",
                                           [*BASE, options, "task.train.size=40", "task.eval=null", also,
                                            f"train.output_dir={tmp_path}"]))
    assert len(kept_out.train) == 40 and len(kept_out.also["seen"]) == 5
    assert not puzzles & {r["puzzle"] for r in kept_out.train}
    kept_in = build_task_data(load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml",
                                          [*BASE, options, "task.train.size=40", "task.eval=null", also,
                                           "task.exclude_eval_from_train=false", f"train.output_dir={tmp_path}"]))
    assert puzzles <= {r["puzzle"] for r in kept_in.train}


CHECK_CASES = [
    # (case, eval.also YAML, fragments of the one error line)
    ("unknown-key", "[{name: four, limt: 3}]", ["eval.also[0].limt: unknown key", "did you mean 'limit'"]),
    ("missing-name", "[{source: sudoku4/dream_4x4.jsonl}]", ["eval.also[0].name: required but missing"]),
    ("bad-name", "[{name: 'a/b'}]", ["eval.also[0].name: use up to 80 letters", "(got 'a/b')"]),
    ("dot-name", "[{name: '..'}]", ["eval.also[0].name"]),
    ("duplicate-name", "[{name: four}, {name: six}, {name: four}]",
     ["eval.also[2].name: 'four' is also the name of eval.also[0]"]),
    ("unknown-option", "[{name: four, options: {box_colz: 2}}]",
     ["eval.also[0].options.box_colz: unknown key; did you mean 'box_cols'"]),
    ("merged-options", "[{name: big, options: {box_cols: 3, box_rows: 3, max_blanks: 90}}]",
     ["eval.also[0].options.max_blanks", "81 cells"]),
    ("inherited-option", "[{name: tiny, options: {box_rows: 1}, source: generate}]",
     ["eval.also[0].options.max_blanks", "task.options sets max_blanks; override it in eval.also[0].options"]),
    ("unknown-column", "[{name: four, columns: {grid: g}}]", ["eval.also[0].columns.grid: task 'sudoku' reads"]),
    ("limit-absurd", "[{name: four, limit: 100000000000}]", ["eval.also[0].limit: too large"]),
    ("not-a-list", "{name: four}", ["eval.also: Input should be a valid list"]),
]


@pytest.mark.parametrize("also,expected", [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check_refuses_bad_entries_with_one_line(tmp_path, capsys, also, expected):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: tiny}\ntask:\n  name: sudoku\n  options: {min_blanks: 4, max_blanks: 8}\n"
                    f"finetune: full\ntrain: {{steps: 10, warmup_steps: 2}}\neval:\n  base: true\n  also: {also}\n",
                    encoding="utf-8")
    code, out, err = run_cli(["check", str(path)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}:"), err
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err and "Value error" not in err


def test_check_reads_the_extra_sets(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: tiny}\ntask:\n  name: sudoku\n  options: {box_rows: 2, box_cols: 3, max_blanks: 8}\n"
                    "  train: {size: 8}\nfinetune: full\n"
                    f"train: {{steps: 10, warmup_steps: 2, output_dir: {tmp_path / 'run'}}}\n"
                    "eval:\n  also: [{name: four, source: sudoku4/d1_test.jsonl, options: {box_cols: 2}, limit: 4}]\n",
                    encoding="utf-8")
    code, out, err = run_cli(["check", str(path), *SMALL_MODEL_SET], capsys)
    assert code == 0, err
    assert "eval.also 'four' gives 500 examples" in out


SMALL_MODEL_SET = [item for line in SMALL_MODEL for item in ("--set", line)]


def test_options_are_merged_over_the_tasks():
    from dgemma_ft.api import Recipe
    from dgemma_ft.finetune.recipe import source_options

    recipe = Recipe.from_dict({"task": {"name": "sudoku", "options": {"box_rows": 2, "box_cols": 3, "max_blanks": 8,
                                                                        "prompt_style": "grid"}},
                               "finetune": "full", "eval": {"also": [{"name": "four", "options": {"box_cols": 2}}]}})
    merged = source_options(recipe, 0)
    assert (merged.box_rows, merged.box_cols, merged.max_blanks, merged.prompt_style) == (2, 2, 8, "grid")
    with pytest.raises(UserError, match=r"^recipe: eval.also\[0\].options.box_cols"):
        Recipe.from_dict({"task": {"name": "sudoku"}, "finetune": "full",
                          "eval": {"also": [{"name": "x", "options": {"box_cols": 7}}]}})
