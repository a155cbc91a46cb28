"""The Python API (`from dgemma_ft import ...`): each function returns what its command makes (a run folder with
its report, a report, an answer, a merged folder, a push plan), agrees with the CLI, and raises the CLI's one-line
`UserError`; examples/quickstart.py runs end to end."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dgemma_ft
from cli_helpers import SMALL_MODEL, run_cli
from dgemma_ft import (Generation, MergeResult, PushResult, Recipe, Report, RunResult, api, check, estimate, evaluate,
                       generate, merge, push, train)
from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import Recipe as RecipeModel
from dgemma_ft.finetune.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sudoku-4x4-tiny.yaml"
TINY_MODEL = [*SMALL_MODEL, "task.train.size=64", "task.exclude_sources=[]", "train.batch_size=4", "train.threads=1"]
SMALL = [*TINY_MODEL, "train.warmup_steps=1", "train.steps=2", "train.log_every=1", "task.eval.source=generate",
         "task.eval.size=4", "eval.steps=[1]", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunResult:
    out = tmp_path_factory.mktemp("api") / "run"
    return train(RECIPE, overrides=[*SMALL, f"train.output_dir={out}"], quiet=True)


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_import_is_lazy_and_exports_the_api():
    probe = "import sys, dgemma_ft; print('dgemma_ft.api' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]
    assert dgemma_ft.train is api.train and dgemma_ft.Recipe is api.Recipe
    assert set(dgemma_ft.__all__) <= set(dir(dgemma_ft))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        dgemma_ft.nothing_here  # noqa: B018


def test_a_recipe_from_a_file_or_a_dict_with_either_kind_of_overrides_is_the_same():
    lines = ["train.steps=400", "train.betas=[0.9, 0.95]", "train.output_dir=runs/x", "eval.steps=[1, 4]"]
    values = {"train.steps": 400, "train.betas": (0.9, 0.95), "train.output_dir": Path("runs/x"), "eval.steps": [1, 4]}
    expected = load_recipe(RECIPE, lines).model_dump()
    by_lines, by_values = Recipe.load(RECIPE, lines), Recipe.load("sudoku-4x4-tiny.yaml", values)  # shipped name
    from_dict = Recipe.from_dict(yaml.safe_load(RECIPE.read_text()), values)
    for recipe in (by_lines, by_values, from_dict):
        assert isinstance(recipe, Recipe) and isinstance(recipe, RecipeModel)
        assert recipe.model_dump() == expected
    assert Recipe.load(RECIPE, "train.steps=410").train.steps == 410  # one line on its own
    with pytest.raises(UserError, match="overrides 'train.steps': a recipe cannot hold object values"):
        Recipe.load(RECIPE, {"train.steps": object()})


@pytest.mark.parametrize("data, message", [
    ({"task": {"name": "sudoku"}, "finetune": "full", "train": {"stepz": 3}},
     "train.stepz: unknown key; did you mean 'steps'?"),
    ({"task": {"name": "sudoku"}, "finetune": "full", "train": {"warmup_steps": 900}},
     "warmup_steps (900) must be fewer than steps (800)"),
    ({"task": {"name": "sudoku"}, "finetune": "full", "train": {"lr": -1}}, "train.lr"),
    ({"task": {"name": "sudoku", "train": {"columns": {"nope": "x"}}}, "finetune": "full"}, "columns.nope"),
    ({"task": {"name": "sudoku"}}, "finetune: LoRA on a freshly initialised tiny model"),
    ([1, 2], "a recipe is a mapping of sections"),
])
def test_a_dicts_recipe_errors_are_the_files_without_the_line(tmp_path, data, message):
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as from_file:
        Recipe.load(file)
    with pytest.raises(UserError) as from_dict:
        Recipe.from_dict(data, name="notebook")
    assert str(from_dict.value).startswith("notebook: ") and message in str(from_dict.value)
    assert str(from_file.value).split(": ", 1)[1] == str(from_dict.value).split(": ", 1)[1]


def test_train_returns_the_run_folder_its_report_and_summary(run):
    assert isinstance(run, RunResult) and (run.run_dir / "model" / "config.json").exists()
    assert os.fspath(run) == str(run.run_dir)  # a RunResult goes wherever a run folder's path does
    assert isinstance(run.report, Report) and run.report.folder == run.run_dir / "eval"
    assert run.report == json.loads((run.run_dir / "eval" / "report.json").read_text())
    assert [(r["steps"], r["examples"]) for r in run.report["results"]] == [(1, 4)]
    assert run.summary == json.loads((run.run_dir / "train_summary.json").read_text()) and run.summary["steps"] == 2


def test_train_of_a_finished_run_with_resume_returns_its_report_at_once(run, capsys):
    again = train(run.run_dir / "recipe.yaml", resume=True)
    assert again.run_dir == run.run_dir and again.report == run.report and again.summary == run.summary
    out = _flat(capsys.readouterr().out)
    assert "already finished at step 2" in out and "evaluation report of these weights" in out


def test_evaluate_returns_the_report_the_cli_writes(run, tmp_path, capsys):
    report = evaluate(run, limit=3, steps=[1, 2], out=tmp_path / "api", quiet=True)
    assert capsys.readouterr().out == ""  # quiet: no progress, no table
    code, out, err = run_cli(["eval", str(run.run_dir), "--limit", "3", "--steps", "1,2", "--out",
                              str(tmp_path / "cli")], capsys)
    assert code == 0, err
    assert report.folder == tmp_path / "api" and report == json.loads((tmp_path / "api" / "report.json").read_text())
    written = json.loads((tmp_path / "cli" / "report.json").read_text())

    def answers(found: dict) -> list:
        return [(r["model"], r["steps"], r["examples"], r["correct"], r["mean_score"]) for r in found["results"]]

    assert answers(report) == answers(written) and len(report["results"]) == 2
    assert report["evaluation"]["scope"] == written["evaluation"]["scope"] == "partial"
    outputs = [[json.loads(line)["output"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
               for folder in (tmp_path / "api", tmp_path / "cli")]
    assert outputs[0] == outputs[1]
    default = evaluate(run.run_dir, limit=2, steps=2, quiet=True)  # a path works too; one step count
    assert default.folder == run.run_dir / "evals" / "limit-2_steps-2" and (default.folder / "report.md").exists()


def test_evaluate_takes_a_recipe_object_for_its_run(run):
    recipe = Recipe.load(run.run_dir / "recipe.yaml")
    report = evaluate(recipe, limit=2, quiet=True)
    assert report["target"] == str(run.run_dir) and report["results"][0]["examples"] == 2


def test_generate_returns_the_answer_its_verdict_and_trace(run, tmp_path, capsys):
    answer = generate(run, example=1, steps=2, trace=tmp_path / "trace.png")
    assert isinstance(answer, Generation) and answer.correct in (True, False) and answer.verdict["reason"]
    assert answer.trace == tmp_path / "trace.png" and answer.trace.read_bytes()[:4] == b"\x89PNG"
    assert generate(run, example=1, steps=2).text == answer.text  # seeded: the same answer again
    code, out, err = run_cli(["generate", str(run.run_dir), "--example", "1", "--steps", "2"], capsys)
    assert code == 0, err
    stats = answer.stats
    assert (f"{stats['denoising_steps']} denoising steps, {stats['decoder_forwards']} decoder forwards"
            in _flat(out)) and ("correct" if answer.correct else "wrong") in out
    free = generate(run, "1000\n0002\n4003\n0000", steps=2)
    assert free.verdict is None and free.correct is None and free.trace is None and free.stats["denoising_steps"]


def test_plots_leave_a_notebooks_matplotlib_backend_and_pyplot_alone(run, tmp_path):
    probe = ("import sys, matplotlib; matplotlib.use('pdf'); from dgemma_ft import evaluate, generate; "
             f"generate({str(run.run_dir)!r}, example=1, steps=2, trace={str(tmp_path / 'trace.png')!r}); "
             f"evaluate({str(run.run_dir)!r}, limit=1, steps=[1], out={str(tmp_path / 'eval')!r}, quiet=True); "
             "print(matplotlib.rcParams['backend'], 'matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pdf", "False"]  # the notebook's choice stands; no pyplot figure was kept
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "eval" / "solve_rate_vs_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_and_push_return_their_results_and_take_each_others(run, tmp_path, capsys):
    merged = merge(run, tmp_path / "merged", dtype="float32", quiet=True)
    assert isinstance(merged, MergeResult) and merged.out == tmp_path / "merged" and merged.layout == "full"
    assert (merged.out / "config.json").exists() and sum(merged.files.values()) > 0
    assert generate(merged, example=1, steps=2).text == generate(run, example=1, steps=2).text
    plan = push(merged, "me/tiny", dry_run=True, quiet=True)
    assert isinstance(plan, PushResult) and plan.dry_run and plan.url is None and plan.card.strip()
    assert "README.md" in dict(plan.files) and "config.json" in dict(plan.files)
    assert capsys.readouterr().out == ""  # quiet
    push(run, "me/tiny", dry_run=True)  # not quiet: the card and the file list, as the command prints them
    shown = capsys.readouterr().out
    code, out, err = run_cli(["push", str(run.run_dir), "--repo", "me/tiny", "--dry-run"], capsys)
    assert code == 0, err
    assert shown == out and "dry run: would push" in out


def test_check_and_estimate_agree_with_the_cli(tmp_path, capsys):
    output_dir = f"train.output_dir={tmp_path / 'out'}"
    lines = check(RECIPE, overrides=[output_dir])
    code, out, err = run_cli(["check", str(RECIPE), "--set", output_dir], capsys)
    assert code == 0, err
    assert all(_flat(line) in _flat(out) for line in lines) and "sample targets fit canvases of 24" in lines[-1]
    from_object = check(Recipe.load(RECIPE, [output_dir]))
    assert from_object[0] == "recipe: keys and values valid" and from_object[1:] == lines[1:]
    plan = estimate(RECIPE, batch_size=2)
    code, out, err = run_cli(["estimate", str(RECIPE), "--batch-size", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == plan.to_dict()


def test_library_progress_bars_are_off_during_a_call_and_restored_after(monkeypatch):
    import datasets
    import transformers

    seen = []
    monkeypatch.setattr(api, "plan_memory", lambda recipe, **options: seen.append(
        (datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())))
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()
    estimate(RECIPE)
    assert seen == [(False, False)]
    assert datasets.is_progress_bar_enabled() and transformers.utils.logging.is_progress_bar_enabled()


def test_errors_are_the_clis_one_line(run, capsys):
    folder = str(run.run_dir)
    cases = [
        (lambda: check(RECIPE, overrides={"train.lr": -1}), ["check", str(RECIPE), "--set", "train.lr=-1"]),
        (lambda: train(RECIPE, overrides={"train.output_dir": folder}), [str(RECIPE), "--set",
                                                                          f"train.output_dir={folder}"]),
        (lambda: evaluate(run, limit=0), ["eval", folder, "--limit", "0"]),
        (lambda: evaluate(run, device="tpu"), ["eval", folder, "--device", "tpu"]),
        (lambda: generate(run), ["generate", folder]),
        (lambda: generate(run, example=5000), ["generate", folder, "--example", "5000"]),
        (lambda: merge(run, run.run_dir / "model"), ["merge", folder, "--out", f"{folder}/model"]),
        (lambda: push(run, "not a repo", dry_run=True), ["push", folder, "--repo", "not a repo", "--dry-run"]),
        (lambda: estimate(RECIPE, batch_size=0), ["estimate", str(RECIPE), "--batch-size", "0"]),
    ]
    for call, args in cases:
        with pytest.raises(UserError) as raised:
            call()
        code, _, err = run_cli(args, capsys)
        assert code == 2 and f"error: {raised.value}" in err.splitlines(), (args, str(raised.value), err)


QUICK = [*TINY_MODEL, "eval.limit=4", "eval.steps=[1]"]


def test_quickstart_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))  # defines main(); runs nothing
    out = str(tmp_path / "quick")
    made = quickstart["main"](steps=2, out=out, eval_limit=2, sets=QUICK)
    printed = capsys.readouterr().out
    assert "run folder" in printed and "solved" in printed and "merged checkpoint" in printed
    assert made["run"].report["results"][0]["examples"] == 4 and made["quick"]["results"][0]["examples"] == 2
    assert made["answer"].trace.exists() and (made["merged"].out / "config.json").exists()
    again = quickstart["main"](steps=2, out=out, eval_limit=2, sets=QUICK)  # a second run reuses the run folder
    assert again["run"].summary == made["run"].summary and again["run"].report == made["run"].report


@pytest.mark.slow
def test_quickstart_as_shipped(tmp_path):
    """The script as a user runs it: 300 training steps of the shipped tiny model (minutes on 2 cores)."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path / "qs")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "972 (" in done.stdout and "merged checkpoint" in done.stdout
