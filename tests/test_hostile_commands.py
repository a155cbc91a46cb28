"""eval, generate, merge and push given hostile input: every refusal is one `error:` line naming the option and
the fix, before any model loads or any file is written, and the files that must survive are left unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from cli_helpers import SMALL_MODEL, run_cli
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import train

ROOT = Path(__file__).resolve().parent.parent
# The tiny model at its smallest, two training steps, and an eval set of 4 puzzles at 2 denoising steps.
SMALL = [*SMALL_MODEL, "task.train.size=32", "task.exclude_sources=[]", "train.batch_size=4", "train.warmup_steps=1",
         "train.threads=1", "train.steps=2", "train.log_every=1", "task.eval.size=4", "eval.steps=[2]",
         "eval.batch_size=8"]
UNWRITABLE = "/proc/dgemma-ft-test"  # refused even for root (tests run as root, so chmod proves nothing)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    return train(load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", [*SMALL, f"train.output_dir={out}"]))


@pytest.fixture
def math_recipe(tmp_path) -> Path:
    """An untrained tiny model on the math task: `eval RECIPE --data FILE` takes free-text questions."""
    recipe = tmp_path / "math.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "dtype": "float32",
                  "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 16,
                           "global_head_dim": 16, "moe_intermediate_size": 16}},
        "task": {"name": "math", "train": {"source": "generate", "size": 16}, "eval": {"source": "generate",
                                                                                      "size": 4}},
        "finetune": "full", "train": {"steps": 2, "warmup_steps": 1, "output_dir": str(tmp_path / "no-run")},
        "eval": {"steps": [1]}}))
    return recipe


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model loads or a sampler is built: refusals must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("dgemma_ft.finetune.model_loading.load_model", refuse)
    monkeypatch.setattr("dgemma_ft.inference.sampling.BlockDiffusionSampler.__init__", refuse)


@pytest.fixture
def no_sampler(monkeypatch):
    """Fail the test if the sampler is built (it allocates the prompt's tensors)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the sampler was built before the refusal")

    monkeypatch.setattr("dgemma_ft.inference.sampling.BlockDiffusionSampler.__init__", refuse)


def one_error(code, err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- 1, 2: output paths first
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    return path


@pytest.mark.parametrize("command, option, path, fragment", [
    ("eval", "--out", "{file}", "is a file"),
    ("eval", "--out", "{file}/report", "is a file"),
    ("eval", "--out", UNWRITABLE, "not writable"),
    ("eval", "--out", "{run}/model", "holds the model's files"),  # push uploads every file there
    ("eval", "--out", "{run}", "holds the model's files"),
    ("generate", "--trace", "{file}/trace.png", "is a file"),
    ("generate", "--trace", UNWRITABLE + "/trace.png", "not writable"),
    ("generate", "--trace", "{tmp}/trace.txt", ".png or .gif"),
    ("generate", "--trace", "{tmp}/trace.jpg", ".png or .gif"),
    ("generate", "--trace", "{tmp}/trace", ".png or .gif"),
])
def test_unusable_output_paths_are_refused_before_the_model_loads(run_dir, a_file, tmp_path, no_model, capsys,
                                                                   command, option, path, fragment):
    path = path.format(file=a_file, tmp=tmp_path, run=run_dir)
    extra = ["--example", "0", "--steps", "1"] if command == "generate" else ["--limit", "1"]
    before = tree(run_dir)
    code, _, err = run_cli([command, str(run_dir), *extra, option, path], capsys)
    one_error(code, err, option, fragment)
    assert a_file.read_text() == "keep me" and not (tmp_path / "trace.txt").exists() and tree(run_dir) == before


def test_trace_suffix_is_case_insensitive(run_dir, tmp_path, capsys):
    trace = tmp_path / "TRACE.GIF"
    code, out, err = run_cli(["generate", str(run_dir), "--example", "0", "--steps", "1", "--trace", str(trace)],
                             capsys)
    assert code == 0, err
    assert trace.read_bytes()[:3] == b"GIF" and f"trace: {trace}" in out.replace("\n", "")


# ------------------------------------------------------------------------------------------------- 3: --steps
@pytest.mark.parametrize("command, steps", [("generate", "0"), ("generate", "-1"), ("eval", "0"), ("eval", "-1"),
                                            ("eval", "4,0")])
def test_non_positive_steps_are_refused(run_dir, no_model, capsys, command, steps):
    extra = ["--prompt", "1000"] if command == "generate" else []
    code, _, err = run_cli([command, str(run_dir), *extra, f"--steps={steps}"], capsys)
    one_error(code, err, "--steps", "positive")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_missing_or_unknown_target_is_named_with_the_command_given(tmp_path, no_model, capsys, command):
    extra = ["--prompt", "1000"] if command == "generate" else []
    code, _, err = run_cli([command, str(tmp_path / "nowhere"), *extra], capsys)
    one_error(code, err, f"error: {command}: '{tmp_path / 'nowhere'}' does not exist")
    code, _, err = run_cli([command, str(tmp_path), *extra], capsys)  # a folder, but no run and no model
    one_error(code, err, f"error: {command}: '{tmp_path}' is neither a run folder")


# ---------------------------------------------------------------------------------------- 4: prompt lengths
def test_an_over_long_prompt_is_refused_before_the_sampler(run_dir, no_sampler, capsys):
    code, _, err = run_cli(["generate", str(run_dir), "--prompt", "7" * 120_000, "--steps", "1"], capsys)
    one_error(code, err, "--prompt", "120,0", "tokens", "4,096 positions", "max_position_embeddings", "shorten")


def test_an_over_long_example_in_data_refuses_the_whole_eval(math_recipe, no_sampler, tmp_path, capsys):
    rows = [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
            {"question": "x" * 1_000_000, "answer": "#### 1"},
            {"question": "What is 3+3?", "answer": "3+3=6\n#### 6"}]
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report"
    code, _, err = run_cli(["eval", str(math_recipe), "--data", str(data), "--out", str(out)], capsys)
    one_error(code, err, f"--data '{data}'", "example 1", "1,000,0", "max_position_embeddings", "remove")
    assert not out.exists()  # nothing half-written

    code, _, err = run_cli(["generate", str(math_recipe), "--data", str(data), "--example", "1"], capsys)
    one_error(code, err, "--example 1", f"'{data}'", "max_position_embeddings")


def test_an_over_long_reference_answer_is_refused(math_recipe, no_sampler, tmp_path, capsys):
    data = tmp_path / "long-answer.jsonl"
    data.write_text(json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n" * 2000 + "#### 4"}) + "\n")
    code, _, err = run_cli(["eval", str(math_recipe), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    one_error(code, err, "longest reference answer", f"'{data}'", "example 0", "max_position_embeddings")


# --------------------------------------------------------------------------------------- 5: partial evaluations
def test_partial_eval_leaves_the_full_report_and_the_card_says_what_it_shows(run_dir, capsys):
    code, _, err = run_cli(["eval", str(run_dir)], capsys)
    assert code == 0, err
    full = tree(run_dir / "eval")
    assert json.loads((run_dir / "eval" / "report.json").read_text())["evaluation"]["scope"] == "full"

    code, out, err = run_cli(["eval", str(run_dir), "--limit", "2", "--steps", "1"], capsys)
    assert code == 0, err
    assert tree(run_dir / "eval") == full  # byte for byte
    partial = run_dir / "evals" / "limit-2_steps-1"
    record = json.loads((partial / "report.json").read_text())["evaluation"]
    assert record["scope"] == "partial" and record["differences"] == ["--limit 2", "--steps 1"]
    assert record["examples"] == 2 and record["full_examples"] == 4
    assert "Partial evaluation" in (partial / "report.md").read_text() and "partial evaluation" in out

    code, out, err = run_cli(["push", str(run_dir), "--repo", "me/tiny-sudoku", "--dry-run"], capsys)
    assert code == 0, err
    card = out.replace("\n", " ")
    assert "Evaluation: the recipe's full eval set (`sudoku4/dream_4x4.jsonl`, 4 examples), denoising steps 2" in card
    assert "written by dgemma-ft" in card and "partial" not in card and "| 2/" not in card

    # a partial report written over the main one on purpose (--out RUN/eval) is named as such on the card
    code, _, err = run_cli(["eval", str(run_dir), "--limit", "2", "--no-pin", "--out", str(run_dir / "eval")],
                           capsys)
    assert code == 0, err
    code, out, err = run_cli(["push", str(run_dir), "--repo", "me/tiny-sudoku", "--dry-run"], capsys)
    assert code == 0, err
    assert "Evaluation: a partial evaluation (--limit 2, --no-pin)" in out.replace("\n", " ")
    code, _, err = run_cli(["eval", str(run_dir)], capsys)  # restore the full report for the other tests
    assert code == 0, err


@pytest.mark.parametrize("options, differences, folder", [
    ({}, [], None),
    ({"limit": 4}, [], None),  # the whole eval set is the recipe's evaluation
    ({"steps": [2], "pins": [True], "seed": 0}, [], None),  # the recipe's own values
    ({"limit": 2}, ["--limit 2"], "limit-2"),
    ({"steps": [1, 4]}, ["--steps 1,4"], "steps-1-4"),
    ({"pins": [False]}, ["--no-pin"], "no-pin"),
    ({"renoises": [False]}, ["--no-renoise"], "no-renoise"),
    ({"compare": True, "pins": [True, False], "renoises": [False, True]}, ["--compare"], "compare"),
    ({"seed": 3}, ["--seed 3"], "seed-3"),
    ({"data": "more/numbers.jsonl", "limit": 5}, ["--data more/numbers.jsonl", "--limit 5"],
     "data-numbers_limit-5"),
    ({"adapter": "runs/other/adapter"}, ["--adapter runs/other/adapter"], "adapter-other"),
])
def test_what_makes_an_evaluation_partial(run_dir, options, differences, folder):
    from dgemma_ft.inference.run_eval import differences_from_recipe, partial_folder_name

    recipe = load_recipe(run_dir / "recipe.yaml")
    arguments = {"adapter": None, "data": None, "limit": None, "steps": recipe.eval.steps, "pins": [recipe.eval.pin],
                 "renoises": [recipe.eval.renoise], "seed": recipe.eval.seed, "compare": False, **options}
    examples = min(arguments["limit"] or 4, 4)
    found = differences_from_recipe(recipe, examples=examples, full_examples=None if arguments["data"] else 4,
                                    **arguments)
    assert found == differences
    if folder:
        assert partial_folder_name(found) == folder


@pytest.mark.parametrize("own, run, picked", [
    (None, {"evaluation": {"scope": "full"}}, "run"),
    ({"evaluation": {"scope": "partial"}}, {"evaluation": {"scope": "full"}}, "run"),
    ({"evaluation": {"scope": "full"}}, {"evaluation": {"scope": "full"}}, "own"),
    ({"evaluation": {"scope": "partial"}}, {"evaluation": {"scope": "partial"}}, "own"),
    ({"evaluation": {"scope": "partial"}}, None, "own"),
])
def test_a_merged_card_never_shows_a_partial_report_over_a_full_one(own, run, picked):
    from dgemma_ft.finetune.push import _prefer_run_report

    assert _prefer_run_report(own, run) == (picked == "run")


# ------------------------------------------------------------------------------------------ 6: merge --out
@pytest.mark.parametrize("out", ["{run}", "{run}/checkpoints", "{run}/model", "{run}/eval/merged", "{run}/..",
                                 "{run}/../run/./adapter/..", "{link}"])
def test_merge_never_writes_over_the_run(run_dir, tmp_path, capsys, out):
    link = tmp_path / "link"
    link.symlink_to(run_dir / "model")
    before = tree(run_dir)
    code, _, err = run_cli(["merge", str(run_dir), "--out", out.format(run=run_dir, link=link), "--force"], capsys)
    one_error(code, err, "--out", "overwrite the run folder", "choose a folder outside it")
    assert tree(run_dir) == before


def test_merge_out_under_a_file_or_unwritable_is_refused(run_dir, a_file, capsys):
    for out, fragment in ((f"{a_file}/merged", "is a file"), (UNWRITABLE, "not writable"), (str(a_file), "file")):
        code, _, err = run_cli(["merge", str(run_dir), "--out", out], capsys)
        one_error(code, err, "--out", fragment)
    assert a_file.read_text() == "keep me"


# ------------------------------------------------------------------------------------------- 7: push --repo
@pytest.mark.parametrize("repo, fragment", [
    ("me/x--y..z", "'--' or '..'"),
    ("me/x..y", "'--' or '..'"),
    ("me/-x", "not starting or ending"),
    ("me/x.", "not starting or ending"),
    ("me/x y", "letters, digits"),
    ("plain-name", "exactly one '/'"),
    ("a/b/c", "exactly one '/'"),
    ("me/", "owner/name"),
    ("/x", "owner/name"),
    ("me/" + "x" * 97, "96"),
])
def test_push_refuses_invalid_repo_ids_first(tmp_path, capsys, repo, fragment):
    missing = tmp_path / "no-such-run"  # the repo id is checked before the folder is even looked at
    code, _, err = run_cli(["push", str(missing), "--repo", repo, "--dry-run"], capsys)
    one_error(code, err, "--repo", fragment, "e.g. --repo your-name/")
