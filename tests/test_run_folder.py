"""The life of a run folder under careless use: Ctrl-C exits non-zero and the folder can start again, one training
at a time, a finished run resumes to nothing, `--resume` skips incomplete checkpoints and torn log lines, and
library noise that a user cannot act on stays out of the output."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import SMALL_MODEL, run_cli
from safetensors.torch import load_file

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import train
from dgemma_ft.finetune.run_folder import claim, incomplete_reason, inspect
from dgemma_ft.quiet import MISSING_KEYS, _SharedKeysFilter, quiet_known_noise

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sudoku-4x4-tiny.yaml"
SMALL = [*SMALL_MODEL, "task.train.size=64", "task.eval.size=8", "train.batch_size=4", "train.warmup_steps=1",
         "train.log_every=1", "train.threads=1", "task.exclude_sources=[]", "train.keep_checkpoints=10"]


def overrides(run_dir, steps, every=2):
    return [*SMALL, f"train.steps={steps}", f"train.checkpoint_every={every}", f"train.output_dir={run_dir}"]


def recipe(run_dir, steps, every=2):
    return load_recipe(RECIPE, overrides(run_dir, steps, every))


def cli_args(run_dir, steps, every=2, *extra):
    return ["train", str(RECIPE), "--no-eval", *extra, *sum((["--set", o] for o in overrides(run_dir, steps, every)),
                                                            [])]


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def digest(folder: Path) -> str:
    hasher = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"):  # lock: pid, time
        hasher.update(file.name.encode() + file.read_bytes())
    return hasher.hexdigest()


def test_ctrl_c_exits_130_and_a_run_without_checkpoint_starts_again(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "dgemma_ft.cli", *cli_args(run_dir, 100000, 100000)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = run_dir / "logs" / "train_log.jsonl"
    deadline = time.time() + 120
    try:
        while not (log.exists() and log.read_text().strip()):
            assert process.poll() is None, process.communicate()[1]
            assert time.time() < deadline, "training did not start within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=180)  # a hang guard, generous for a loaded machine
    finally:  # a failed wait must not leave a 100,000-step run behind (one kept a core busy for 24 minutes)
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130
    assert "no checkpoint was written yet" in stderr and "Traceback" not in stderr
    assert "gemm_4bit_forward" not in stderr, "bitsandbytes' optional-kernel notice is noise here"
    assert (run_dir / "recipe.yaml").exists() and not (run_dir / "checkpoints" / "checkpoint-1").exists()

    assert inspect(run_dir, 2).kind == "unstarted"
    train(recipe(run_dir, 2), resume=True)  # --resume on it starts from step 0 instead of refusing
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2], "the stopped run's log lines must not stay"


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_at_the_next_step(tmp_path, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a finalizer; the press is still recorded, and training stops
    at the next step end with the usual one-line message."""
    from dgemma_ft.errors import Interrupted
    from dgemma_ft.finetune.trainer import BlockDiffusionTrainer

    original = BlockDiffusionTrainer.compute_loss
    calls = []

    def compute_loss(self, *args, **kwargs):
        calls.append(self.state.global_step)
        if len(calls) == 2:  # SIGINT delivered while a finalizer runs: the handler fires, its exception is lost
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlockDiffusionTrainer, "compute_loss", compute_loss)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    with pytest.raises(Interrupted, match="interrupted at step 2"):
        train(recipe(tmp_path / "run", 50, 100))
    assert calls == [0, 1], "the step that saw the press ends, and no other starts"
    assert signal.getsignal(signal.SIGINT) is before, "the handler is put back"


def test_interrupted_run_starts_again_without_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("from a run stopped before its first checkpoint\n")
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    code, out, err = run_cli(cli_args(run_dir, 2), capsys)
    out = flat(out)
    assert code == 0, err
    assert "starting it again from step 0" in out
    assert load_recipe(run_dir / "recipe.yaml").train.steps == 2


def test_a_second_training_into_a_claimed_folder_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    lock = claim(run_dir)  # another training holds the folder
    try:
        code, out, err = run_cli(cli_args(run_dir, 2), capsys)
    finally:
        lock.release()
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert "in use by another training" in flat(err) and f"pid {os.getpid()}" in err
    assert not (run_dir / "recipe.yaml").exists()
    code, _, err = run_cli(cli_args(run_dir, 2), capsys)  # released: the folder is free again
    assert code == 0, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(recipe(run_dir, 4))
    return run_dir


def test_resume_on_a_finished_run_trains_nothing_and_says_so(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = digest(run_dir)
    code, out, err = run_cli(cli_args(run_dir, 4, 2, "--resume"), capsys)
    out = flat(out)
    assert code == 0, err
    assert "already finished at step 4" in out and "nothing to resume" in out
    assert digest(run_dir) == before, "a finished run resumed must not change"
    code, _, err = run_cli(cli_args(run_dir, 4), capsys)
    assert code == 2 and "already holds a finished run" in flat(err)
    code, _, err = run_cli(cli_args(run_dir, 3, 2, "--resume"), capsys)
    assert code == 0  # fewer steps than trained: finished too, nothing is re-trained
    assert digest(run_dir) == before


def test_run_stopped_after_its_last_checkpoint_saves_without_training(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "model")  # killed between the checkpoint at train.steps and the final save
    train(recipe(run_dir, 4), resume=True)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4, "the Trainer resumed at max_steps would train a fifth step"
    assert not (run_dir / "checkpoints" / "checkpoint-5").exists()
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    trained = load_file(str(finished_run / "model" / "model.safetensors"))
    assert saved.keys() == trained.keys()
    assert all(saved[k].equal(trained[k]) for k in saved)


def test_resume_falls_back_from_incomplete_checkpoints_and_drops_a_torn_log_line(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    weights = checkpoints / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn write of the newest checkpoint
    (checkpoints / "checkpoint-5").mkdir()  # and an empty folder past it
    log = run_dir / "logs" / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')
    code, out, err = run_cli(cli_args(run_dir, 6, 2, "--resume"), capsys)
    out = flat(out)
    assert code == 0, err
    assert "checkpoint-5 is incomplete (no trainer_state.json)" in out
    assert "checkpoint-4 is incomplete (model.safetensors is truncated" in out
    assert (checkpoints / "incomplete-checkpoint-4").is_dir()
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses again
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_past_the_steps_asked(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "model")
    with pytest.raises(UserError, match=r"checkpoint-4 is already past train.steps \(3\)"):
        train(recipe(run_dir, 3), resume=True)


def _torch_zip(path: Path) -> None:
    torch.save({"x": torch.zeros(3)}, str(path))


CHECKPOINT_CASES = [
    ("empty folder", lambda c: None, "no trainer_state.json"),
    ("corrupt state", lambda c: (c / "trainer_state.json").write_text('{"global'), "trainer_state.json is corrupt"),
    ("no weights", lambda c: (c / "trainer_state.json").write_text("{}"), "no weights"),
    ("safetensors header only", lambda c: ((c / "trainer_state.json").write_text("{}"),
                                           (c / "model.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{}")),
     "model.safetensors is truncated or corrupt"),
    ("torn optimizer", lambda c: ((c / "trainer_state.json").write_text("{}"), _torch_zip(c / "model.bin"),
                                  (c / "optimizer.pt").write_bytes(b"PK\x03\x04 torn")),
     "optimizer.pt is truncated or corrupt"),
    ("torn rng state of one process", lambda c: ((c / "trainer_state.json").write_text("{}"),
                                                 _torch_zip(c / "model.bin"), _torch_zip(c / "rng_state_0.pth"),
                                                 (c / "rng_state_1.pth").write_bytes(b"PK\x03\x04 torn")),
     "rng_state_1.pth is truncated or corrupt"),
    ("shards without .metadata", lambda c: ((c / "trainer_state.json").write_text("{}"),
                                            (c / "pytorch_model_fsdp_0").mkdir(),
                                            (c / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x"),
                                            (c / "optimizer_0").mkdir(),
                                            (c / "optimizer_0" / "__0_0.distcp").write_bytes(b"x")),
     "optimizer_0 has no .metadata (not every process finished writing its shards)"),
    ("complete", lambda c: ((c / "trainer_state.json").write_text("{}"), _torch_zip(c / "model.bin"),
                            _torch_zip(c / "optimizer.pt"), _torch_zip(c / "rng_state.pth")), None),
    ("complete, sharded", lambda c: ((c / "trainer_state.json").write_text("{}"), (c / "pytorch_model_fsdp_0").mkdir(),
                                     (c / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")), None),
]


@pytest.mark.parametrize("name, make, reason", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_completeness(tmp_path, name, make, reason):
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    make(checkpoint)
    assert incomplete_reason(checkpoint) == reason


def test_resume_prints_no_shared_missing_keys_but_keeps_real_ones(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # sees what passes the logger's own filters
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    try:
        code, out, err = run_cli(cli_args(run_dir, 5, 2, "--resume"), capsys)
    finally:
        logger.removeHandler(handler)
    assert code == 0, err
    assert (run_dir / "checkpoints" / "checkpoint-5").is_dir(), "the run resumed (and loaded checkpoint-4)"
    assert not [r for r in records if "missing keys" in str(r.msg)]
    keys_filter = _SharedKeysFilter({"model.encoder.a", "model.decoder.a"})
    record = logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, MISSING_KEYS + "['model.encoder.a'].",
                               None, None)
    assert not keys_filter.filter(record)
    record.msg = MISSING_KEYS + "['model.encoder.a', 'lm_head.weight']."
    assert keys_filter.filter(record), "a key that is not a shared alias is still reported"


def test_known_library_warnings_are_silenced_narrowly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
