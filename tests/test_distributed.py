"""Multi-process training on CPU (gloo): DDP through torchrun, and FSDP2 full shard through `accelerate launch` with
the shipped recipes/accelerate/fsdp.yaml (tests/cpu_fsdp_launch.py lets accelerate use FSDP on CPU), for full
fine-tuning and LoRA. FSDP must agree with DDP, and encoder and decoder weights must come out shared."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
TINY = ROOT / "recipes" / "sudoku-4x4-tiny.yaml"
LORA = ROOT / "recipes" / "sudoku-4x4-lora-tiny.yaml"
SMALL = [*SMALL_MODEL, "task.train.size=64", "task.eval.size=16", "train.batch_size=4", "train.warmup_steps=1",
         "train.log_every=1", "train.threads=1", "task.exclude_sources=[]", "train.steps=3",
         "train.checkpoint_every=2"]
LORA_SMALL = ["task.train.size=32", "task.eval.size=8", "train.batch_size=4", "train.steps=3", "train.warmup_steps=1",
              "train.log_every=1", "train.threads=1", "lora.r=4", "task.exclude_sources=[]"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(overrides) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def _run(command) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def launch_fsdp(recipe: Path, overrides, resume: bool = False) -> None:
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` with two CPU processes."""
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
          "--num_processes", "2", "--main_process_port", str(_free_port()),
          str(ROOT / "tests" / "cpu_fsdp_launch.py"), "train", str(recipe), "--no-eval",
          *(["--resume"] if resume else []), *_sets(overrides)])


def launch_ddp(recipe: Path, overrides) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
          "-m", "dgemma_ft.cli", "train", str(recipe), "--no-eval", *_sets(overrides)])


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    launch_fsdp(TINY, [*SMALL, f"train.output_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    launch_ddp(TINY, [*SMALL, f"train.output_dir={run_dir}"])
    return run_dir


def test_ddp_two_cpu_processes(ddp_run):
    assert json.loads((ddp_run / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((ddp_run / "train_summary.json").read_text())["examples_per_second"] > 0
    assert (ddp_run / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").exists()
    assert (ddp_run / "model" / "model.safetensors").exists()


def test_fsdp_full_shard_trains_and_keeps_encoder_decoder_weights_shared(fsdp_run):
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma_ft.finetune.model_loading import load_model
    from dgemma_ft.finetune.recipe import load_recipe

    assert json.loads((fsdp_run / "trainer_state.json").read_text())["global_step"] == 3
    assert list((fsdp_run / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp")), \
        "no sharded FSDP checkpoint: the run fell back to DDP"
    assert len(losses(fsdp_run)) == 3 and all(math.isfinite(x) for x in losses(fsdp_run))
    assert math.isfinite(json.loads((fsdp_run / "train_summary.json").read_text())["train_loss"])
    assert json.loads((fsdp_run / "model" / "config.json").read_text())["architectures"] == \
        ["DiffusionGemmaForBlockDiffusion"]

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(fsdp_run / "model"))
    encoder, decoder = model.model.encoder.language_model, model.model.decoder
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers):
        dec_params = dict(dec_layer.named_parameters())
        for name, param in enc_layer.named_parameters():
            assert dec_params[name] is param, name
    assert encoder.embed_tokens.weight is decoder.embed_tokens.weight is model.lm_head.weight

    initial = load_model(load_recipe(fsdp_run / "recipe.yaml").model).model
    q_proj = encoder.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, initial.model.encoder.language_model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(encoder.embed_tokens.weight, initial.model.decoder.embed_tokens.weight)


def test_fsdp_and_ddp_make_the_same_updates(fsdp_run, ddp_run):
    """Same data, same noise, averaged gradients: the runs agree to float rounding. This also checks that DDP
    all-reduces gradients (a DDP rank training on its own data alone would disagree)."""
    assert losses(ddp_run) == pytest.approx(losses(fsdp_run), rel=1e-5)
    fsdp_weights, ddp_weights = weights(fsdp_run), weights(ddp_run)
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, value in fsdp_weights.items():
        torch.testing.assert_close(value, ddp_weights[name], atol=1e-5, rtol=0, msg=name)


def test_fsdp_lora_writes_one_shared_adapter(fsdp_run, tmp_path):
    from dgemma_ft.finetune.lora import adapter_layout, load_adapter, read_adapter_tensors
    from dgemma_ft.finetune.model_loading import load_model
    from dgemma_ft.finetune.recipe import load_recipe

    run_dir = tmp_path / "lora"
    launch_fsdp(LORA, [*LORA_SMALL, f"model.name={fsdp_run}", f"train.output_dir={run_dir}"])
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and adapter_layout(adapter) == "shared"
    assert all(math.isfinite(x) for x in losses(run_dir))
    tensors = read_adapter_tensors(adapter)
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B is still all zeros: nothing was trained"

    base = load_model(load_recipe(run_dir / "recipe.yaml").model).model
    adapted = load_adapter(base, adapter)
    layers = [adapted.get_base_model().model.encoder.language_model.layers[0],
              adapted.get_base_model().model.decoder.layers[0]]
    assert layers[0].self_attn.q_proj is layers[1].self_attn.q_proj


@pytest.mark.slow
def test_fsdp_resume_from_a_sharded_checkpoint_repeats_the_step(fsdp_run, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(fsdp_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-3")
    launch_fsdp(run_dir / "recipe.yaml", [f"train.output_dir={run_dir}"], resume=True)
    assert losses(run_dir) == pytest.approx(losses(fsdp_run), rel=1e-5)
    for name, value in weights(fsdp_run).items():
        torch.testing.assert_close(weights(run_dir)[name], value, atol=1e-5, rtol=0, msg=name)
