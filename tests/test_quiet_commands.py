"""A normal run prints nothing on stderr that the user cannot act on: no notice of bitsandbytes' optional CPU
kernel (it probes for it at import, i.e. in every command that loads a model, and logs when the probe fails),
no deprecation warning for keywords the kit itself passes. bitsandbytes logs once per process, so each command
runs in a process of its own, as a user's would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import train

from cli_helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "recipes" / "sudoku-4x4-tiny.yaml"
SMALL = [*SMALL_MODEL, "task.train.size=8", "task.exclude_sources=[]", "train.batch_size=2", "train.warmup_steps=0",
         "train.threads=1", "train.steps=1", "eval.limit=2", "eval.steps=[2]"]


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma_ft.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=900)


def test_commands_that_load_no_model_print_nothing_on_stderr():
    for args in (["--help"], ["check", str(TINY_RECIPE)], ["estimate", str(ROOT / "recipes" / "sudoku.yaml")]):
        done = run_command(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", f"dgemma-ft {' '.join(args)} printed on stderr:\n{done.stderr}"


def test_a_4bit_training_run_and_its_evaluation_print_nothing_on_stderr(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = train(load_recipe(TINY_RECIPE, [*SMALL, f"train.output_dir={tmp_path / 'base'}"]))
    qlora = [f"model.name={base}", "model.load_in_4bit=true", "finetune=lora", f"train.output_dir={tmp_path / 'q'}",
             *SMALL[6:]]
    # offline, `kernels` also says it skips the probe's publisher check: both notices are covered
    done = run_command("train", str(TINY_RECIPE), *(a for o in qlora for a in ("--set", o)),
                       env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q" / "eval" / "report.json").exists(), "the run was evaluated after training"
    assert done.stderr == "", f"a QLoRA run printed on stderr:\n{done.stderr}"
