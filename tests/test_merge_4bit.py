"""QLoRA merge: an adapter trained on the 4-bit base (linears and experts in NF4) folds into the full-precision
base (`merge` reloads it without 4-bit), and the base-fingerprint check holds across precisions: the fingerprint
hashes the embeddings (full precision under 4-bit, rounded to bf16), so the 4-bit-trained adapter is accepted on
its own fp32 base and refused on another one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model

from dgemma_ft.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
# expert tensors of whole NF4 blocks per expert (see quantize_experts): 2*64*64 and 64*64 weights
SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32, global_head_dim=64,
            moe_intermediate_size=64, num_experts=8, top_k_experts=2)


def _save_base(folder: Path, seed: int) -> Path:
    model, tokenizer = build_tiny_model(TinySpec(**SPEC, seed=seed))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _load_fp32(folder: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(folder), dtype=torch.float32).eval()


def _load_4bit(folder: Path):
    from dgemma_ft.finetune.model_loading import load_model
    from dgemma_ft.finetune.recipe import ModelSection

    return load_model(ModelSection(name=str(folder), load_in_4bit=True, dtype="float32")).model.eval()


def _logits(model, inputs):
    ids, canvas = inputs
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, another base of the same shapes (other seed), and a LoRA run trained on the first in 4-bit."""
    from dgemma_ft.finetune.recipe import load_recipe
    from dgemma_ft.finetune.run import train

    root = tmp_path_factory.mktemp("merge_4bit")
    base = _save_base(root / "base", seed=0)
    _save_base(root / "other_base", seed=1)
    recipe = load_recipe(ROOT / "recipes" / "sudoku-4x4-lora-tiny.yaml", [
        f"model.name={base}", "model.load_in_4bit=true", "model.dtype=float32", "finetune=lora", "lora.r=4",
        "lora.alpha=8", "task.train.size=32", "task.eval.size=8", "task.exclude_sources=[]", "train.batch_size=4",
        "train.steps=4", "train.warmup_steps=1", "train.lr=3e-2", "train.min_lr=3e-2", "train.log_every=1",
        "train.threads=1", "train.checkpoint_every=100", f"train.output_dir={root / 'run'}"])
    train(recipe)
    return root


@pytest.fixture(scope="module")
def inputs():
    draw = torch.Generator().manual_seed(0)
    return torch.randint(6, 90, (2, 10), generator=draw), torch.randint(0, 90, (2, 32), generator=draw)


def test_4bit_trained_adapter_merges_into_the_full_precision_base(world, inputs):
    from dgemma_ft.finetune import quantize_experts as qe
    from dgemma_ft.finetune.lora import adapter_layout, load_adapter
    from dgemma_ft.finetune.merge import MERGE_RECORD
    from dgemma_ft.inference.run_eval import resolve_target

    from dgemma_ft.cli import main

    run, out = world / "run", world / "merged"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["load_in_4bit"] is True
    assert adapter_layout(run / "adapter") == "shared"
    main(["merge", str(run), "--out", str(out), "--dtype", "float32"])

    # a standard full-precision checkpoint: no quantization config, nothing packed, text weights shared
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = _load_fp32(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    for encoder, decoder in zip(merged.model.encoder.language_model.layers, merged.model.decoder.layers):
        assert encoder.self_attn.q_proj.weight.data_ptr() == decoder.self_attn.q_proj.weight.data_ptr()
        assert encoder.mlp.down_proj.weight.data_ptr() == decoder.mlp.down_proj.weight.data_ptr()
        assert encoder.experts.gate_up_proj.data_ptr() == decoder.experts.gate_up_proj.data_ptr()
        assert not qe.is_quantized(encoder.experts)
    assert (out / "model.safetensors").stat().st_size <= (world / "base" / "model.safetensors").stat().st_size * 1.01

    # exactly the fp32 base + the (unmerged) adapter
    base_fp32 = _logits(_load_fp32(world / "base"), inputs)
    expected = _logits(load_adapter(_load_fp32(world / "base"), run / "adapter").eval(), inputs)
    got = _logits(merged, inputs)
    assert (expected - base_fp32).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # and close to what was trained: the adapter on the 4-bit base, within the order of the NF4 error itself
    base_4bit = _logits(_load_4bit(world / "base"), inputs)
    four = _logits(load_adapter(_load_4bit(world / "base"), run / "adapter").eval(), inputs)
    nf4_error = (base_4bit - base_fp32).abs().mean()
    merge_gap = (four - got).abs().mean()
    print(f"mean |logit| diff: base fp32 vs 4-bit {nf4_error:.4f}; merged vs 4-bit adapter {merge_gap:.4f}; "
          f"adapter effect {(expected - base_fp32).abs().mean():.4f}")
    assert torch.isfinite(four).all() and 0 < merge_gap < 2 * nf4_error

    # the merged folder evaluates as the full-precision model it is (not re-quantized by the run's 4-bit recipe)
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["layout"] == "shared" and record["dtype"] == "float32" and record["base"] == str(world / "base")
    assert record["trained_in_4bit"] is True
    target = resolve_target(out)
    assert target.kind == "merged" and target.recipe.model.load_in_4bit is False
    assert target.recipe.finetune == "lora" and target.recipe.task.name == "sudoku"

    # the usual QLoRA deliverable: the bf16 base with the adapter folded in
    main(["merge", str(run), "--out", str(world / "merged_bf16"), "--dtype", "bfloat16"])
    assert json.loads((world / "merged_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = _logits(_load_fp32(world / "merged_bf16"), inputs)  # bf16 weights, computed in fp32
    assert (bf16 - expected).abs().mean() < 0.25 * (expected - base_fp32).abs().mean()


def test_fingerprint_matches_across_precisions_and_refuses_another_base(world, tmp_path):
    from dgemma_ft.finetune.lora import (
        BASE_RECORD,
        base_fingerprint,
        check_adapter_base,
        load_adapter,
    )
    from dgemma_ft.finetune.merge import merge

    adapter = world / "run" / "adapter"
    saved = json.loads((adapter / BASE_RECORD).read_text())
    assert saved["base"] == str(world / "base")
    four = _load_4bit(world / "base")
    assert four.model.decoder.embed_tokens.weight.dtype == torch.float32  # embeddings stay full precision
    fp32 = _load_fp32(world / "base")
    from transformers import DiffusionGemmaForBlockDiffusion

    bf16 = DiffusionGemmaForBlockDiffusion.from_pretrained(str(world / "base"), dtype=torch.bfloat16)
    assert saved["fingerprint"] == base_fingerprint(four) == base_fingerprint(fp32) == base_fingerprint(bf16)
    check_adapter_base(fp32, adapter)
    check_adapter_base(bf16, adapter)

    other = _load_fp32(world / "other_base")
    assert base_fingerprint(other) != saved["fingerprint"]
    with pytest.raises(UserError, match="fingerprint"):
        check_adapter_base(other, adapter)
    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(_load_4bit(world / "other_base"), adapter)

    # the run's recipe pointed at the other base: merge refuses, writes nothing
    run = tmp_path / "run"
    shutil.copytree(world / "run" / "adapter", run / "adapter")
    recipe = yaml.safe_load((world / "run" / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(world / "other_base")
    recipe["train"]["output_dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(UserError, match="fingerprint") as caught:
        merge(run, tmp_path / "out", dtype="float32")
    assert "recipe.yaml" in str(caught.value) and not (tmp_path / "out").exists()
