"""Hostile inputs: `dgemma-ft check` must catch what training would fail on (output folders, tiny sizes the model
cannot run, broken model and run folders, a backend this machine lacks), and `train` / `eval` must fail the same
way: one `error:` line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 16, "global_head_dim": 16,
         "moe_intermediate_size": 16}
QUICK = ["task.train.size=8", "task.exclude_sources=[]", "train.threads=1"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model folder, a full run on it (model/) and a LoRA run on it (adapter/), built directly (no
    training: these tests break folders, they do not need trained weights)."""
    from dgemma_ft.finetune.lora import attach_lora, save_adapter

    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    model, tokenizer = build_tiny_model(TinySpec(**SMALL))
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))

    full = root / "full"
    _write_run_recipe(full, "tiny", "full")
    shutil.copytree(base, full / "model")

    lora = root / "lora"
    _write_run_recipe(lora, str(base), "lora")
    peft_model = attach_lora(model, r=2, alpha=4, dropout=0.0)
    save_adapter(peft_model, lora / "adapter", str(base))
    tokenizer.save_pretrained(str(lora / "adapter"))
    return {"base": base, "full": full, "lora": lora}


def _write_run_recipe(run: Path, name: str, finetune: str) -> None:
    """recipe.yaml plus the traces training leaves (logs/, trainer_state.json), as a finished run has them."""
    tiny = [f"model.tiny.{key}={value}" for key, value in SMALL.items()]
    recipe = load_recipe(RECIPE, [*tiny, *QUICK, f"model.name={name}", f"finetune={finetune}",
                                  f"train.output_dir={run}", "task.eval.size=4"])
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    (run / "logs").mkdir()
    (run / "trainer_state.json").write_text("{}")


def _copy(world, tmp_path, which: str) -> Path:
    """A private copy of a fixture folder, for a test to break."""
    target = tmp_path / which
    shutil.copytree(world[which], target)  # a LoRA run's recipe still names the shared base by path
    return target


def _assert_one_error_line(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in " ".join(lines), err


# ------------------------------------------------------------------------------------- breaking model folders
def _write(name, text):
    def setup(folder: Path) -> None:
        (folder / name).write_text(text)
    return setup


def _break_config(text):
    return _write("config.json", text)


def _remove(*patterns):
    def setup(folder: Path) -> None:
        for pattern in patterns:
            for file in folder.glob(pattern):
                file.unlink()
    return setup


def _truncate(name):
    def setup(folder: Path) -> None:
        file = folder / name
        file.write_bytes(file.read_bytes()[:100])
    return setup


def _resize_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))


MODEL_FOLDER_CASES = [
    ("config-not-json", _break_config('{"model_type": '), "config.json is not valid JSON (line"),
    ("config-llama", _break_config('{"model_type": "llama", "hidden_size": 8}'),
     "is a llama model, not DiffusionGemma"),
    ("config-empty", _break_config("{}"), "without model_type: not a DiffusionGemma"),
    ("config-list", _break_config("[1, 2]"), "holds a JSON list, not a model config"),
    ("no-weights", _remove("*.safetensors"), "has no weights (*.safetensors)"),
    ("truncated-weights", _truncate("model.safetensors"), "model.safetensors is damaged"),
    ("no-tokenizer", _remove("tokenizer*.json"), "has no tokenizer (tokenizer.json)"),
]


# ------------------------------------------------------------------------------------------ breaking run folders
def _run_recipe_text(text):
    def setup(run: Path) -> None:
        (run / "recipe.yaml").write_text(text)
    return setup


def _run_recipe_bytes(run: Path) -> None:
    (run / "recipe.yaml").write_bytes(b"\xff\xfe\x00garbage\xb9")


def _run_recipe_edit(old, new):
    def setup(run: Path) -> None:
        text = (run / "recipe.yaml").read_text()
        assert old in text
        (run / "recipe.yaml").write_text(text.replace(old, new.format(run=run)))
    return setup


def _run_base(name):
    """Point the run's recipe at another base (`{run}` is the run folder itself)."""
    def setup(run: Path) -> None:
        import yaml

        data = yaml.safe_load((run / "recipe.yaml").read_text())
        data["model"]["name"] = name.format(run=run)
        (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return setup


def _adapter(setup_in_adapter):
    def setup(run: Path) -> None:
        setup_in_adapter(run / "adapter")
    return setup


def _delete_adapter(run: Path) -> None:
    shutil.rmtree(run / "adapter")


RUN_FOLDER_CASES = [  # (name, fixture run, setup, expected fragment)
    ("recipe-not-yaml", "full", _run_recipe_text("model: [\n"), "has a broken recipe.yaml"),
    ("recipe-bad-value", "full", _run_recipe_edit("hidden_size: 32", "hidden_size: -3"), "model.tiny.hidden_size"),
    ("recipe-not-text", "full", _run_recipe_bytes, "UTF-8"),
    ("recipe-names-itself", "lora", _run_base("{run}"), "leads back to itself"),
    ("base-gone", "lora", _run_base("{run}/gone"), "names a base that cannot be used"),
    ("adapter-deleted", "lora", _delete_adapter, "adapter is missing; the run has no trained adapter (re-train, or "
                                                 "point --adapter at one)"),
    ("adapter-emptied", "lora", _adapter(_remove("adapter_model.safetensors")),
     "has no adapter_model.safetensors; the run has no trained adapter"),
    ("adapter-config-not-json", "lora", _adapter(_write("adapter_config.json", '{"r": ')),
     "adapter_config.json is not valid JSON"),
    ("adapter-config-keys", "lora", _adapter(_write("adapter_config.json", '{"foo": 1}')),
     "adapter_config.json is corrupt (no peft_type, r, target_modules)"),
    ("adapter-truncated", "lora", _adapter(_truncate("adapter_model.safetensors")),
     "adapter_model.safetensors is damaged"),
    ("model-config-not-json", "full", lambda run: _break_config("{")(run / "model"), "is not valid JSON"),
]


# ------------------------------------------------------------------------------------------------------ check
def _file(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file"


RECIPE_CASES = [  # (name, --set overrides given tmp_path, expected fragment)
    ("output-dir-is-file", lambda t: [f"train.output_dir={_file(t)}"], "train.output_dir"),
    ("output-dir-under-file", lambda t: [f"train.output_dir={_file(t)}/run"], "no folder can be made under it"),
    ("output-dir-unwritable", lambda t: ["train.output_dir=/proc/dgemma-ft-run"], "is not writable"),
    ("tiny-head-dim-odd", lambda t: ["model.tiny.head_dim=7"], "model.tiny.head_dim: must be even"),
    ("tiny-global-head-dim-odd", lambda t: ["model.tiny.global_head_dim=3"], "model.tiny.global_head_dim"),
    ("tiny-hidden-size", lambda t: ["model.tiny.hidden_size=30"], "model.tiny.hidden_size: must be a multiple of 8"),
    ("tiny-moe-size", lambda t: ["model.tiny.moe_intermediate_size=12"], "model.tiny.moe_intermediate_size"),
    ("tiny-kv-heads", lambda t: ["model.tiny.num_attention_heads=15", "model.tiny.num_key_value_heads=5"],
     "use num_key_value_heads 1 or 3"),
    ("missing-relative-path", lambda t: ["model.name=./nope/model"], "model.name './nope/model': no such folder"),
    ("missing-absolute-path", lambda t: [f"model.name={t}/nope"], "no such folder"),
    ("missing-deep-path", lambda t: ["model.name=no/such/thing"], "model.name 'no/such/thing': no such folder"),
    ("missing-trailing-slash", lambda t: ["model.name=owner/name/"], "no such folder"),
    ("missing-home-path", lambda t: ["model.name=~/no-such-dgemma-model"], "no such folder"),
    ("missing-bare-name", lambda t: ["model.name=nope"], "model.name 'nope': no such folder"),
    ("name-is-a-file", lambda t: [f"model.name={_file(t)}"], "is a file; point it at the folder"),
]


@pytest.mark.parametrize("name, overrides, fragment", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_check_reports_recipe_problems(name, overrides, fragment, tmp_path, capsys):
    code, _, err = run_cli(["check", RECIPE, *_sets(overrides(tmp_path))], capsys)
    _assert_one_error_line(code, err, fragment)


@pytest.mark.parametrize("name, setup, fragment", MODEL_FOLDER_CASES, ids=[c[0] for c in MODEL_FOLDER_CASES])
def test_check_reports_broken_model_folders(name, setup, fragment, world, tmp_path, capsys):
    folder = _copy(world, tmp_path, "base")
    setup(folder)
    code, _, err = run_cli(["check", RECIPE, *_sets([f"model.name={folder}"])], capsys)
    _assert_one_error_line(code, err, fragment)


@pytest.mark.parametrize("how", ["model.name=RUN", "check RUN"])
@pytest.mark.parametrize("name, which, setup, fragment", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_check_reports_broken_run_folders(name, which, setup, fragment, how, world, tmp_path, capsys):
    run = _copy(world, tmp_path, which)
    setup(run)
    if how == "check RUN":
        code, _, err = run_cli(["check", str(run), *_sets([])], capsys)
    else:
        code, _, err = run_cli(["check", RECIPE, *_sets([f"model.name={run}"])], capsys)
    _assert_one_error_line(code, err, fragment)


@pytest.mark.parametrize("target, fragment", [("folder", "is a folder without recipe.yaml"),
                                              ("binary", "UTF-8")])
def test_check_reports_targets_that_are_not_recipes(target, fragment, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    if target == "folder":
        path = tmp_path
    else:
        path.write_bytes(b"\xff\xfe\x00\xb9")
    code, _, err = run_cli(["check", str(path)], capsys)
    _assert_one_error_line(code, err, fragment)


def test_check_accepts_the_intact_folders(world, capsys):
    for which in ("base", "full", "lora"):
        code, out, err = run_cli(["check", RECIPE, *_sets([f"model.name={world[which]}"])], capsys)
        assert code == 0, err
        assert "sample targets fit canvases of 32" in _one_spaced(out)  # a long tmp path may wrap the line
        if which != "base":
            code, out, err = run_cli(["check", str(world[which]), *_sets([])], capsys)
            assert code == 0 and "run folder readable" in _one_spaced(out), err


def _one_spaced(text: str) -> str:
    return " ".join(text.split())


def test_check_reports_unsloth_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(["check", RECIPE, *_sets(["model.backend=unsloth"])], capsys)
    _assert_one_error_line(code, err, "model.backend: unsloth needs a CUDA GPU (NVIDIA)")
    assert "use backend: peft" in err


def _sets(overrides):
    return [arg for item in [*QUICK, *overrides] for arg in ("--set", item)]


# ------------------------------------------------------------------------------- training fails the same way
TRAIN_CASES = [  # (name, overrides given (world, tmp_path), expected fragment)
    ("tiny-head-dim-odd", lambda w, t: ["model.tiny.head_dim=7"], "model.tiny.head_dim: must be even"),
    ("missing-path", lambda w, t: ["model.name=./nope/model"], "no such folder"),
    ("foreign-config", lambda w, t: [f"model.name={_broken_base(w, t, _setup('config-llama'))}"],
     "is a llama model"),
    ("no-weights", lambda w, t: [f"model.name={_broken_base(w, t, _setup('no-weights'))}"], "has no weights"),
    ("config-resized", lambda w, t: [f"model.name={_broken_base(w, t, _resize_config)}"],
     "its weights do not match its config.json"),
    ("run-recipe-broken", lambda w, t: [f"model.name={_broken_run(w, t)}"], "has a broken recipe.yaml"),
    ("unsloth", lambda w, t: ["model.backend=unsloth"], "unsloth needs a CUDA GPU"),
]


def _setup(name: str):
    return next(setup for case, setup, _ in MODEL_FOLDER_CASES if case == name)


def _broken_base(world, tmp_path, setup) -> Path:
    folder = _copy(world, tmp_path, "base")
    setup(folder)
    return folder


def _broken_run(world, tmp_path) -> Path:
    run = _copy(world, tmp_path, "full")
    (run / "recipe.yaml").write_text("model: [\n")
    return run


@pytest.mark.parametrize("name, overrides, fragment", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_fails_the_same_way_before_writing(name, overrides, fragment, world, tmp_path, capsys):
    if name == "unsloth" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    code, _, err = run_cli(["train", RECIPE, "--no-eval", *_sets([*overrides(world, tmp_path), "finetune=full",
                                                                  f"train.output_dir={out}"])], capsys)
    _assert_one_error_line(code, err, fragment)
    assert not out.exists(), "a failed start must leave no run folder"


# ------------------------------------------------------------------------------------------ eval of a broken run
EVAL_CASES = [c for c in RUN_FOLDER_CASES if c[0] in ("adapter-deleted", "adapter-emptied",
                                                      "adapter-config-not-json", "adapter-config-keys",
                                                      "adapter-truncated")]


@pytest.mark.parametrize("name, which, setup, fragment", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_of_a_run_with_a_broken_adapter(name, which, setup, fragment, world, tmp_path, capsys):
    run = _copy(world, tmp_path, which)
    setup(run)
    code, _, err = run_cli(["eval", str(run), "--limit", "1", "--steps", "1", "--out", str(tmp_path / "o")], capsys)
    _assert_one_error_line(code, err, fragment)
    assert "trained on another base" not in err


# --------------------------------------------------------------------------------------------- tiny sizes
def test_sizes_that_pass_validation_but_cannot_run_fail_at_build():
    """The forward probe in `build_tiny_model` catches what the explicit size rules miss."""
    spec = TinySpec.model_construct(**{**TinySpec().model_dump(), **SMALL, "head_dim": 7})
    with pytest.raises(UserError, match="model.tiny: DiffusionGemma cannot run these sizes"):
        build_tiny_model(spec)


def test_build_probe_leaves_the_model_and_random_state_as_they_were():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, _ = build_tiny_model(TinySpec(**SMALL))
    assert torch.equal(before, torch.get_rng_state())
    second, _ = build_tiny_model(TinySpec(**SMALL))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
