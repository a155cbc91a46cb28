"""The command line: check, eval (reports, plots, base comparison), generate (answer, verdict, trace), and the
one-line errors for bad targets, adapters and data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import train
from cli_helpers import SMALL_MODEL, run_cli

ROOT = Path(__file__).resolve().parent.parent
SMALL = [*SMALL_MODEL, "task.train.size=64", "task.exclude_sources=[]", "train.batch_size=4", "train.warmup_steps=1",
         "train.threads=1", "train.steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [*SMALL, f"train.output_dir={out}"])
    return train(recipe)


def test_check_valid_and_invalid_recipes(capsys, tmp_path):
    code, out, _ = run_cli(["check", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml")], capsys)
    assert code == 0 and "the recipe is valid" in out and "sample targets fit canvases of 24" in out
    code, _, err = run_cli(["check", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"), "--set", "train.lr=-1"], capsys)
    assert code == 2 and "train.lr" in err and "greater than 0" in err
    code, _, err = run_cli(["check", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"), "--set",
                            "task.eval.source=nowhere/missing.jsonl"], capsys)
    assert code == 2 and "data file not found" in err and "nowhere/missing.jsonl" in err
    code, _, err = run_cli(["check", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"), "--set", "task.name=chess"],
                           capsys)
    assert code == 2 and "unknown task 'chess'" in err
    code, _, err = run_cli(["check", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"), "--set",
                            "train.max_blocks=1", "--set", "model.tiny.canvas_length=8"], capsys)
    assert code == 2 and "train.max_blocks is 1" in err
    code, _, err = run_cli([str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "recipe not found" in err


def test_check_prints_long_paths_whole_with_their_brackets(capsys, tmp_path):
    recipe = tmp_path / "[exp 1]" / ("a-folder-name-long-enough-that-the-line-passes-any-terminal-width-" * 2) / "r.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text((ROOT / "recipes" / "sudoku-4x4-tiny.yaml").read_text())
    code, out, _ = run_cli(["check", str(recipe)], capsys)
    assert code == 0 and f"recipe {recipe}: keys and values valid\n" in out


def test_eval_writes_reports_and_plots(run_dir, capsys, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["eval", str(run_dir), "--limit", "12", "--steps", "1,4", "--compare", "--base",
                                 "--batch-size", "5", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert len(rows) == 2 * 2 * 2 * 2  # models x steps x pin x renoise
    assert {r["model"] for r in rows} == {"trained", "base"}
    assert all(r["examples"] == 12 and 0 <= r["solve_rate"] <= 1 for r in rows)
    assert all(r["givens_kept_rate"] == 1.0 for r in rows if r["pin"])  # pinning keeps every given
    assert "| model | steps |" in (out / "report.md").read_text()
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 * len(rows)
    assert {"prompt", "output", "verdict", "stats"} <= set(json.loads(predictions[0]))
    for plot in ("solve_rate_vs_steps.png", "training_loss.png", "trace.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "solve" in stdout


def test_eval_of_an_untrained_model_completes_with_zeros(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (ROOT / "recipes" / "sudoku-4x4-tiny.yaml").read_text()
    recipe.write_text(text.replace("output_dir: runs/sudoku-4x4-tiny", f"output_dir: {tmp_path / 'no-run'}"))
    code, _, err = run_cli(["eval", str(recipe), "--limit", "6", "--steps", "2", "--no-pin", "--out",
                            str(tmp_path / "o")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["results"][0]["correct"] == 0 and report["results"][0]["examples"] == 6


def test_generate_prints_answer_verdict_and_trace(run_dir, capsys, tmp_path):
    trace = tmp_path / "trace.png"
    code, out, err = run_cli(["generate", str(run_dir), "--example", "3", "--steps", "4", "--trace", str(trace)],
                             capsys)
    assert code == 0, err
    assert "answer" in out and ("correct" in out or "wrong" in out)
    assert trace.read_bytes()[:4] == b"\x89PNG"
    gif = tmp_path / "trace.gif"
    code, out, err = run_cli(["generate", str(run_dir), "--prompt", "1000\n0002\n4003\n0000", "--steps", "2",
                              "--trace", str(gif)], capsys)
    assert code == 0, err and gif.read_bytes()[:3] == b"GIF"
    code, _, err = run_cli(["generate", str(run_dir), "--example", "5000"], capsys)
    assert code == 2 and "--example 5000" in err
    code, out, err = run_cli(["generate", str(run_dir), "--prompt", "[true, false] [/]", "--steps", "1"], capsys)
    assert code == 0, err
    assert "[true, false] [/]" in out  # printed as text, not read as rich markup


def test_eval_errors_are_one_clear_line(run_dir, capsys, tmp_path):
    code, _, err = run_cli(["eval", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["eval", str(run_dir), "--adapter", str(tmp_path)], capsys)
    assert code == 2 and "no adapter_config.json" in err
    wrong = tmp_path / "numbers.jsonl"
    wrong.write_text(json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n")
    code, _, err = run_cli(["eval", str(run_dir), "--data", str(wrong)], capsys)
    assert code == 2 and "no usable rows for task 'sudoku'" in err
    code, _, err = run_cli(["eval", str(run_dir), "--steps", "0,4"], capsys)
    assert code == 2 and "--steps" in err


def test_help_imports_no_model_library():
    """`dgemma-ft --help` (and a command's --help) only prints text: torch, transformers and datasets stay unloaded."""
    probe = ("import sys\nfrom dgemma_ft.cli import main\nfor args in (['--help'], ['eval', '--help'], []):\n"
             "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'dgemma_ft.api') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "Usage: dgemma-ft" in done.stdout and done.stdout.splitlines()[-1] == "[]"


def test_usage_mistakes_are_clicks_message_without_a_traceback(capsys):
    code, _, err = run_cli(["eval", "somewhere", "--bogus"], capsys)
    assert code == 2 and "No such option: --bogus" in err and "Traceback" not in err
    code, out, err = run_cli([], capsys)  # no arguments: the help
    assert code == 2 and "Usage: dgemma-ft" in out + err and "Traceback" not in err
