"""Hostile recipe and data files: each gives one line naming the file (and line or key) and the fix, never a
traceback, a hang or a silent guess; unusable data rows are counted and shown."""

import json
import os

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.tasks import SourceSpec, get_task
from dgemma_ft.tasks.sources import MAX_LINE_BYTES, read_rows
from dgemma_ft.tasks.json import PATTERN_SECONDS
from cli_helpers import run_cli

BASE = """\
model:
  name: tiny
task:
  name: sudoku
  train: {source: generate, size: 8}
finetune: full
train:
  steps: 10
  warmup_steps: 2
"""
GOOD_ROW = {"puzzle": "1000000240030000", "solution": "1234341241232341"}
SLOW_INPUT = "a" * 40 + "!"  # with Python's `re`, '(a|a)+$' backtracks for hours on this


def with_train(line: str) -> str:
    return BASE + f"  {line}\n"


def with_task(line: str) -> str:
    """BASE with one more line in its `task:` section."""
    return replaced("finetune: full\n", f"  {line}\nfinetune: full\n")


def replaced(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


# ------------------------------------------------------------------------------------------- recipe files
RECIPES = [
    # (case, recipe text or bytes, fragments the one-line error must contain)
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", ["not a text/YAML file", "UTF-8"]),
    ("random-bytes", bytes(range(256)) * 4, ["not a text/YAML file"]),
    ("utf-16", BASE.encode("utf-16"), ["UTF-16", "save it as UTF-8"]),
    ("nul-byte", BASE.encode() + b"\x00\n", ["not a text/YAML file"]),
    ("control-char", replaced("name: tiny", "name: ti\x01ny"), ["not a text/YAML file", "#x01"]),
    ("numeric-top-key", "1: x\n" + BASE, [":1:", "key '1' is read as a number", "quote it"]),
    ("null-top-key", BASE + "null: x\n", [":10:", "key 'null' is read as nothing"]),
    ("boolean-key", BASE + "yes: 1\n", [":10:", "a boolean"]),
    ("numeric-nested-key", with_train("7: 3"), [":10:", "key '7'"]),
    ("duplicate-section", BASE + "train:\n  steps: 20\n", [":10:", "'train' is given twice (lines 7 and 10)"]),
    ("duplicate-nested-key", with_train("steps: 20"), [":10:", "'steps' is given twice (lines 8 and 10)"]),
    ("deep-yaml", "a: " + "[" * 50_000, ["nested too deeply"]),
    ("huge-file", BASE + "#" * (2 * 2**20) + "\n", ["not a recipe", "MiB"]),
    ("steps-true", replaced("steps: 10", "steps: true"), [":8:", "train.steps: give a number, not the boolean true"]),
    ("lr-false", with_train("lr: false"), [":10:", "train.lr: give a number, not the boolean false"]),
    ("lora-r-true", BASE + "lora: {r: true}\n", ["lora.r: give a number"]),
    ("tiny-size-yes", replaced("name: tiny\n", "name: tiny\n  tiny: {hidden_size: yes}\n"),
     [":3:", "model.tiny.hidden_size: give a number"]),
    ("betas-boolean", with_train("betas: [true, 0.9]"), ["train.betas: give a number"]),
    ("eval-steps-boolean", BASE + "eval: {steps: [true]}\n", ["eval.steps: give a number"]),
    ("source-size-boolean", replaced("size: 8", "size: on"), ["task.train.size: give a number"]),
    ("unknown-train-column", replaced("size: 8}", "size: 8, columns: {puzle: board}}"),
     [":5:", "task.train.columns.puzle", "did you mean 'puzzle'", "puzzle, solution"]),
    ("unknown-eval-column", with_task("eval: {source: sudoku4/dream_4x4.jsonl, columns: {grid: g}}"),
     ["task.eval.columns.grid", "reads no field 'grid'", "puzzle, solution"]),
    ("lora-targets-empty", BASE + "lora: {targets: []}\n", ["lora.targets: list at least one of q_proj"]),
    ("lora-targets-unknown", BASE + "lora: {targets: [q_proj, experts]}\n", ["'experts' is not a layer"]),
    ("steps-absurd", replaced("steps: 10", "steps: 1000000000000000000000000000000"),
     ["train.steps: too large", "at most 10,000,000"]),
    ("batch-absurd", with_train("batch_size: 1000000000000"), ["train.batch_size: too large", "65,536"]),
    ("grad-accum-absurd", with_train("grad_accum: 1000000000"), ["train.grad_accum: too large", "65,536"]),
    ("source-size-absurd", replaced("size: 8", "size: 1000000000"), ["task.train.size: too large", "10,000,000"]),
    ("eval-limit-absurd", BASE + "eval: {limit: 100000000000}\n", ["eval.limit: too large"]),
    ("eval-steps-absurd", BASE + "eval: {steps: [4, 100000000]}\n", ["eval.steps: at most 10,000"]),
    ("eval-batch-absurd", BASE + "eval: {batch_size: 10000000}\n", ["eval.batch_size", "65,536"]),
    ("threads-beyond-machine", with_train(f"threads: {(os.cpu_count() or 1) + 1}"),
     [f"this machine has {os.cpu_count() or 1} CPU threads"]),
    ("threads-absurd", with_train("threads: 1000000"), ["train.threads: too large"]),
    ("seed-negative", with_train("seed: -1"), ["train.seed", "greater than or equal to 0"]),
    ("tiny-size-absurd", replaced("name: tiny\n", "name: tiny\n  tiny: {hidden_size: 100000000}\n"),
     ["model.tiny.hidden_size: at most 4,096"]),
    ("tiny-parameters-absurd", replaced("name: tiny\n", "name: tiny\n  tiny: {hidden_size: 4096, "
                                                        "num_experts: 256, moe_intermediate_size: 16384}\n"),
     ["model.tiny: these sizes make about", "parameters"]),
]


@pytest.mark.parametrize("content,expected", [c[1:] for c in RECIPES], ids=[c[0] for c in RECIPES])
def test_hostile_recipe_gives_one_line(tmp_path, content, expected):
    path = tmp_path / "hostile.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    for noise in ("Value error", "(got nothing)", "(got [])", "Traceback"):
        assert noise not in message


def test_folder_as_recipe(tmp_path):
    with pytest.raises(UserError, match="is a folder; give a .yaml recipe file"):
        load_recipe(tmp_path)


def test_merge_keys_may_override(tmp_path):
    """`<<:` merges a mapping whose keys the explicit ones may override: that is not a duplicate key."""
    path = tmp_path / "merge.yaml"
    path.write_text(BASE + "eval:\n  <<: {seed: 1, limit: 3}\n  seed: 2\n")
    recipe = load_recipe(path)
    assert recipe.eval.seed == 2 and recipe.eval.limit == 3


# --------------------------------------------------------------------------------------------- data files
def _sudoku_rows(*extra: bytes) -> bytes:
    return (json.dumps(GOOD_ROW) + "\n").encode() + b"".join(extra)


DATA_FILES = [
    # (case, file name, content, fragments of the one-line DataError)
    ("latin-1-jsonl", "rows.jsonl", _sudoku_rows('{"puzzle": "caf\xe9"}\n'.encode("latin-1")),
     ["rows.jsonl:2: not UTF-8 text (byte 0xe9)", "save the file as UTF-8"]),
    ("latin-1-csv", "rows.csv", "puzzle\n1000000240030000\ncaf\xe9\n".encode("latin-1"),
     ["rows.csv:3: not UTF-8 text (byte 0xe9)", "save the file as UTF-8"]),
    ("latin-1-txt", "rows.txt", b"1000000240030000\ncaf\xe9\n", ["rows.txt:2: not UTF-8 text (byte 0xe9)"]),
    ("latin-1-json", "rows.json", f'[{json.dumps(GOOD_ROW)},\n{{"p": "caf\xe9"}}]'.encode("latin-1"),
     ["rows.json:2: not UTF-8 text", "save the file as UTF-8"]),
    ("deep-json-file", "deep.json", b"[" * 100_000 + b"]" * 100_000, ["deep.json: JSON nested too deeply"]),
    ("csv-row-too-long", "long.csv", b"puzzle\n1000000240030000\n1,2\n", ["long.csv: not readable as CSV",
                                                                          "Expected 1 fields in line 3, saw 2"]),
    ("csv-quote-unclosed", "quote.csv", b'puzzle\n"1000000240030000\n', ["quote.csv: not readable as CSV"]),
    ("csv-name-twice", "twice.csv", b"puzzle,puzzle\n1,2\n", ["twice.csv:1: column 'puzzle' is named twice"]),
    ("broken-parquet", "rows.parquet", b"PAR1 not really", ["rows.parquet: cannot read parquet"]),
    ("unknown-suffix", "rows.tsv", b"1000000240030000\n", ["unsupported file type '.tsv'", ".txt"]),
]


@pytest.mark.parametrize("name,content,expected", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_unreadable_data_file_gives_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        get_task("sudoku").build_dataset("eval", SourceSpec(source=str(path)))
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_folder_named_like_a_data_file(tmp_path):
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(UserError, match="is a folder; give a data file"):
        list(read_rows(str(tmp_path / "x.jsonl")))


BAD_ROWS = [
    # (case, the bad .jsonl line, the reason reported for it)
    ("half-broken", b'{"puzzle": "10000002', "not valid JSON"),
    ("not-an-object", b"[1, 2, 3]", "not a JSON object (a list)"),
    ("deep-row", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ("deep-column", b'{"puzzle": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply"),
    ("huge-line", b'{"puzzle": "' + b"1" * (MAX_LINE_BYTES + 10) + b'"}', "longer than 10 MiB"),
]


@pytest.mark.parametrize("line,reason", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_jsonl_rows_are_counted_and_shown(tmp_path, capsys, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_sudoku_rows(line + b"\n", (json.dumps(GOOD_ROW | {"puzzle": "0" + GOOD_ROW["puzzle"][1:]})
                                                 + "\n").encode()))
    task = get_task("sudoku")
    dataset = task.build_dataset("eval", SourceSpec(source=str(path)))
    assert len(dataset) == 2
    assert [number for number, _ in task.last_report.bad] == [2]
    assert reason in task.last_report.bad[0][1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: eval source")
    assert "1 unusable row(s) dropped: line 2: " in err[0] and reason in err[0]


def test_many_bad_rows_show_the_first_few(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_sudoku_rows(*[b"{broken\n"] * 9))
    task = get_task("sudoku")
    task.build_dataset("eval", SourceSpec(source=str(path)))
    err = capsys.readouterr().err
    assert "9 unusable row(s) dropped: line 2: not valid JSON" in err and "; ... 4 more" in err


def test_columns_checked_when_the_dataset_is_built():
    with pytest.raises(UserError, match=r"task.eval.columns.sum: task 'math' reads no field 'sum'.*question"):
        get_task("math").build_dataset("eval", {"source": "generate", "columns": {"sum": "total"}})
    with pytest.raises(UserError, match="task.train.size: give a number"):
        get_task("math").build_dataset("train", {"size": True})


# ---------------------------------------------------------------------------------- catastrophic patterns
def _schema_row(pattern: str, reference: str) -> dict:
    return {"schema": {"type": "string", "pattern": pattern}, "reference": json.dumps(reference)}


def test_catastrophic_pattern_row_is_reported_not_hung(tmp_path, capsys):
    path = tmp_path / "schemas.jsonl"
    rows = [_schema_row("^a+$", "aaa"), _schema_row("(a+)+$", SLOW_INPUT), _schema_row("(a|a)+$", SLOW_INPUT)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = get_task("json")
    dataset = task.build_dataset("eval", SourceSpec(source=str(path)))
    assert len(dataset) == 1
    reasons = dict(task.last_report.bad)
    assert "does not match '(a+)+$'" in reasons[2]
    assert "pattern '(a|a)+$' takes too long to check" in reasons[3] and f"{PATTERN_SECONDS} s" in reasons[3]
    assert "2 unusable row(s) dropped" in capsys.readouterr().err


def test_catastrophic_pattern_in_an_answer_is_judged_not_hung():
    task = get_task("json")
    example = task.from_row({"schema": {"type": "object", "patternProperties": {"(a|a)+$": {"type": "integer"}},
                                        "additionalProperties": False}}, {})
    verdict = task.validate(example, json.dumps({SLOW_INPUT: 1}))
    assert not verdict.correct and "takes too long to check" in verdict.reason
    assert task.validate(example, '{"aa": 1}').correct
    assert "does not match any of the regexes" in task.validate(example, '{"b": 1}').reason


def test_json_rows_with_huge_numbers_dropped_bare_strings_kept(tmp_path, capsys):
    path = tmp_path / "refs.jsonl"
    number = {"type": "object", "properties": {"x": {"type": "number", "maximum": 5}}}
    path.write_text('{"schema": {"type": "string"}, "reference": "hello"}\n'
                    f'{{"schema": {json.dumps(number)}, "reference": {{"x": 1e400}}}}\n'
                    f'{{"schema": {json.dumps(number)}, "reference": "{{\\"x\\": -1e400}}"}}\n'
                    f'{{"schema": {json.dumps(number)}, "reference": {{"x": 5}}}}\n', encoding="utf-8")
    task = get_task("json")
    dataset = task.build_dataset("eval", SourceSpec(source=str(path)))
    assert [row["messages"][1]["content"] for row in dataset] == ['"hello"', '{"x":5}']
    reasons = dict(task.last_report.bad)
    assert sorted(reasons) == [2, 3]
    assert "/x holds inf, not a JSON number" in reasons[2] and "too large for a float" in reasons[3]
    assert "2 unusable row(s) dropped" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ task options
OPTIONS = [
    # (case, task, options, fragments of the one-line error)
    ("boolean-number", "sudoku", {"box_rows": True}, ["task.options.box_rows: give a number, not the boolean"]),
    ("custom-error", "json", {"min_properties": 5, "max_properties": 2},
     ["task.options.max_properties: min_properties (5) must not exceed max_properties (2)"]),
    ("model-error", "math", {"min_steps": 3, "max_steps": 1}, ["min_steps (3) must not exceed max_steps (1)"]),
    ("unknown-option", "math", {"max_step": 3}, ["task.options.max_step: unknown key; did you mean 'max_steps'"]),
    ("key-not-text", "sudoku", {1: 2}, ["task.options.1: Keys should be strings"]),
]


@pytest.mark.parametrize("name,options,expected", [c[1:] for c in OPTIONS], ids=[c[0] for c in OPTIONS])
def test_task_option_errors_read_naturally(name, options, expected):
    with pytest.raises(UserError) as caught:
        get_task(name, options)
    message = str(caught.value)
    assert "\n" not in message and "Value error" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


# --------------------------------------------------------------------------------------------- the CLI
CLI_CASES = [
    # (case, recipe text or bytes, fragment of the error line)
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", "not a text/YAML file"),
    ("duplicate-key", with_train("steps: 20"), "'steps' is given twice"),
    ("steps-absurd", replaced("steps: 10", "steps: 1000000000000000000000000000000"), "train.steps: too large"),
    ("eval-size-absurd", with_task("eval: {source: generate, size: 1000000000}"), "task.eval.size: too large"),
    ("batch-absurd", with_train("batch_size: 1000000000000"), "train.batch_size: too large"),
    ("unknown-column", with_task("eval: {source: generate, columns: {grid: g}}"), "task.eval.columns.grid"),
]


@pytest.mark.parametrize("content,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_check_refuses_with_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "hostile.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    code, out, err = run_cli(["check", str(path)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0] and str(path) in lines[0]
    assert "Traceback" not in out + err


def test_check_refuses_a_folder(tmp_path, capsys):
    code, _, err = run_cli(["check", str(tmp_path)], capsys)
    assert code != 0 and err.strip().startswith("error:") and "is a folder" in err and len(err.strip().splitlines()) == 1


def test_check_shows_dropped_rows(tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_bytes(_sudoku_rows(b"{broken\n", b"[1]\n"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(with_task(f"eval: {{source: {data}}}"), encoding="utf-8")
    code, out, err = run_cli(["check", str(recipe), "--set", f"train.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    assert "the recipe is valid" in out
    assert "2 unusable row(s) dropped: line 2: not valid JSON" in err and "line 3: not a JSON object" in err
    assert "Traceback" not in out + err
