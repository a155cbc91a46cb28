"""Training end to end on the tiny model: run folder contents, resume after a kill, the NaN guard, LoRA on a
trained tiny base (one shared adapter, mergeable). Multi-process runs (DDP, FSDP) are in test_distributed.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma_ft.errors import UserError
from dgemma_ft.finetune import trainer as trainer_module
from dgemma_ft.finetune.lora import adapter_layout, load_adapter, merge_shared
from dgemma_ft.finetune.merge import merge
from dgemma_ft.finetune.model_loading import load_model
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import build_task_data, train
from dgemma_ft.finetune.run_folder import checkpoints, incomplete_reason
from dgemma_ft.inference.run_eval import run_evaluation

from cli_helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parent.parent
SMALL = [*SMALL_MODEL, "task.train.size=64", "task.eval.size=16", "train.batch_size=4", "train.warmup_steps=1",
         "train.log_every=1", "train.threads=1", "task.exclude_sources=[]"]


def small_recipe(tmp_path, steps=4, extra=()):
    return load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml",
                       [*SMALL, f"train.steps={steps}", f"train.output_dir={tmp_path / 'run'}", *extra])


def test_full_training_writes_a_complete_run_folder(tmp_path):
    recipe = small_recipe(tmp_path, steps=3, extra=["train.checkpoint_every=1", "train.keep_checkpoints=2"])
    run_dir = train(recipe)
    assert (run_dir / "recipe.yaml").exists()
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "model" / "tokenizer.json").exists()
    assert [c.name for c in checkpoints(run_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-3"], \
        "keep_checkpoints=2 keeps the two newest"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    log = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all({"diffusion_loss", "mean_t"} <= set(r) for r in log if "loss" in r)
    assert list((run_dir / "logs").glob("events.out.tfevents.*")), "TensorBoard events missing"
    resolved = load_recipe(run_dir / "recipe.yaml")
    assert resolved.train.steps == 3
    with pytest.raises(UserError, match="already holds a finished run"):
        train(recipe)


def test_training_excludes_every_evaluation_example(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-tiny.yaml", ["task.train.size=3000"])
    data = build_task_data(recipe)
    eval_keys = {data.task.key(row) for row in data.eval}
    d1 = data.task.build_dataset("eval", {"source": "sudoku4/d1_test.jsonl"})
    eval_keys |= {data.task.key(row) for row in d1}
    assert len(eval_keys) == 972 + 500
    assert not eval_keys & {data.task.key(row) for row in data.train}


def test_killed_run_resumes_to_the_requested_step(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "train.steps=8", "train.checkpoint_every=2", f"train.output_dir={run_dir}"]
    command = [sys.executable, "-m", "dgemma_ft.cli", "train", str(ROOT / "recipes" / "sudoku-4x4-tiny.yaml"),
               "--no-eval", *sum((["--set", o] for o in overrides), []), "--set", "train.keep_checkpoints=10"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    try:
        while incomplete_reason(run_dir / "checkpoints" / "checkpoint-2") is not None:  # written in place
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run_dir / "model").exists()
    recipe = load_recipe(run_dir / "recipe.yaml")
    train(recipe, resume=True)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert json.loads((run_dir / "train_summary.json").read_text())["resumed_from_step"] >= 2
    steps = [json.loads(line)["step"] for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and steps[0] == 1
    assert (run_dir / "model" / "model.safetensors").exists()


def test_resume_without_checkpoint_starts_from_step_zero_and_says_so(tmp_path):
    console = Console(record=True, width=400)
    run_dir = train(small_recipe(tmp_path, steps=2), resume=True, console=console)
    assert "has no checkpoint yet; starting from step 0" in console.export_text()
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = trainer_module.block_diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "block_diffusion_loss", flaky)
    recipe = small_recipe(tmp_path, steps=5, extra=["train.checkpoint_every=2"])
    with pytest.raises(trainer_module.NonFiniteLossError, match="checkpoint-2"):
        train(recipe)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_lora_on_a_trained_tiny_base_is_one_shared_mergeable_adapter(tmp_path):
    base_dir = train(small_recipe(tmp_path / "base", steps=2))
    lora_recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-lora-tiny.yaml",
                              ["task.train.size=32", "task.eval.size=8", "train.batch_size=4", "train.steps=3",
                               "train.warmup_steps=1", f"model.name={base_dir}", "train.threads=1",
                               f"train.output_dir={tmp_path / 'lora'}", "lora.r=4"])
    run_dir = train(lora_recipe)
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and adapter_layout(adapter) == "shared"

    base = load_model(lora_recipe.model).model.float().eval()
    ids = torch.randint(6, 90, (2, 30))
    canvas = torch.randint(0, 90, (2, base.config.canvas_length))
    with torch.no_grad():
        plain = PeftModel.from_pretrained(load_model(lora_recipe.model).model.float().eval(), str(adapter))
        expected = plain(input_ids=ids, decoder_input_ids=canvas).logits
        ours = load_adapter(base, adapter)
        torch.testing.assert_close(ours(input_ids=ids, decoder_input_ids=canvas).logits, expected, atol=1e-5,
                                   rtol=0)
        merged = merge_shared(ours)
        torch.testing.assert_close(merged(input_ids=ids, decoder_input_ids=canvas).logits, expected, atol=1e-4,
                                   rtol=0)
    # only text-layer attention/MLP linears carry LoRA; experts, router, vision tower stay frozen
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "vision" not in json.dumps(config["target_modules"])

    # merge -> plain transformers -> same logits; and `eval` on the merged folder answers as the run does
    merged_dir = tmp_path / "merged"
    merge(run_dir, merged_dir, dtype="float32")
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=canvas).logits, expected, atol=1e-4,
                                   rtol=0)
    from_run = run_evaluation(run_dir, limit=8, steps=[4], out_dir=tmp_path / "eval-run")
    from_merged = run_evaluation(merged_dir, limit=8, steps=[4], out_dir=tmp_path / "eval-merged")
    assert from_run["results"][0]["solve_rate"] == from_merged["results"][0]["solve_rate"]
    outputs = [[json.loads(line)["output"] for line in (tmp_path / name / "predictions.jsonl").read_text()
                .splitlines()] for name in ("eval-run", "eval-merged")]
    assert outputs[0] == outputs[1]
