"""Devices: `--device` reaches the model in every command, a device that is not there is one clear line, and the
trained model is released before the evaluation after training loads its own copy."""

import gc
from pathlib import Path

import pytest
import torch

from dgemma_ft.cli import main
from dgemma_ft.errors import UserError
from dgemma_ft.finetune import model_loading
from dgemma_ft.finetune.model_loading import load_model, resolve_device
from dgemma_ft.finetune.recipe import ModelSection

from cli_helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parent.parent
SMALL = [*SMALL_MODEL, "task.train.size=32", "task.eval.source=generate", "task.eval.size=4", "train.batch_size=4",
         "train.warmup_steps=1", "train.threads=1", "task.exclude_sources=[]", "train.steps=2",
         "eval.steps=[1]"]


def _sets(items):
    return [part for item in items for part in ("--set", item)]


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_one_line():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA GPU is visible here; use --device cpu"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_load_model_places_the_model_on_the_recipes_device():
    loaded = load_model(ModelSection(name="tiny", device="cpu", tiny={"hidden_size": 32, "head_dim": 8,
                                                                      "global_head_dim": 8}))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_device_option_reaches_the_loader(tmp_path, monkeypatch, command):
    """Every command hands --device to the model loader (recorded here instead of loading)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipes" / "sudoku-4x4-tiny.yaml").read_text())
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.read_text().replace("finetune: full", "finetune: full"))
    asked = []

    def record(section, merge_adapter=True):
        asked.append(section.device)
        raise UserError("stop here")

    monkeypatch.setattr(model_loading, "load_model", record)
    args = {"eval": ["eval", str(run), "--device", "cpu", "--limit", "1"],
            "generate": ["generate", str(run), "--device", "cpu", "--prompt", "1234"],
            "merge": ["merge", str(run), "--out", str(tmp_path / "merged"), "--device", "cpu"]}[command]
    if command == "merge":  # a full run re-saves model/ without the loader: watch from_pretrained's device_map
        from transformers import DiffusionGemmaForBlockDiffusion

        def fake_from_pretrained(path, **kwargs):
            asked.append(kwargs["device_map"][""])
            raise UserError("stop here")

        monkeypatch.setattr(DiffusionGemmaForBlockDiffusion, "from_pretrained", fake_from_pretrained)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert asked == ["cpu"]


def test_a_bad_device_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "nowhere", "--device", "tpu"])
    assert exited.value.code == 2
    assert "--device 'tpu': give auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err


def test_trained_model_is_released_before_the_evaluation_loads(tmp_path, monkeypatch):
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma_ft.inference import run_eval

    seen = {}
    gc.collect()
    before = sum(isinstance(o, DiffusionGemmaForBlockDiffusion) for o in gc.get_objects())  # other tests' models

    def evaluation(run_dir, console=None, device=None):
        # gc.get_objects also lists unreachable objects not yet collected: a model kept alive by a reference
        # cycle would show up here
        seen["alive"] = sum(isinstance(o, DiffusionGemmaForBlockDiffusion) for o in gc.get_objects()) - before
        seen["device"] = device

    monkeypatch.setattr(run_eval, "run_evaluation", evaluation)
    main(["train", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"), "--device", "cpu",
          *_sets([*SMALL, f"train.output_dir={tmp_path / 'run'}"])])
    assert seen == {"alive": 0, "device": "cpu"}
    assert (tmp_path / "run" / "model" / "config.json").exists()
