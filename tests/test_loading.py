"""Model and data loading errors a user meets first: Hub ids without the Hub, unknown Hub datasets, the Unsloth
backend without a GPU, folders that are not models."""

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.model_loading import load_model
from dgemma_ft.finetune.recipe import ModelSection
from dgemma_ft.tasks import SourceSpec, get_task


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_hub_model_without_the_hub_says_how_to_use_a_local_copy(offline):
    with pytest.raises(UserError) as caught:
        load_model(ModelSection(name="google/diffusiongemma-26B-A4B-it"))
    message = str(caught.value)
    assert "cannot fetch 'google/diffusiongemma-26B-A4B-it'" in message and "local folder" in message


def test_unknown_hub_dataset_offline_is_one_line(offline):
    with pytest.raises(UserError) as caught:
        get_task("math").build_dataset("train", SourceSpec(source="hf:nobody/no-such-dataset:main@train"))
    assert "cannot load Hub dataset 'nobody/no-such-dataset'" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="hf:owner/name"):
        get_task("math").build_dataset("train", SourceSpec(source="hf:not-a-repo-id"))


def test_unsloth_backend_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="unsloth needs a CUDA GPU"):
        load_model(ModelSection(name="google/diffusiongemma-26B-A4B-it", backend="unsloth"))


def test_folder_without_config_and_odd_names(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(ModelSection(name=str(tmp_path)))
    with pytest.raises(UserError, match="neither 'tiny', an existing folder, nor a Hub id"):
        load_model(ModelSection(name="no/such/thing"))


# ------------------------------------------------------------------------------------------------------ Unsloth
FAKE_UNSLOTH = '''
import json, os, sys
with open(os.environ["UNSLOTH_MARKER"], "w") as handle:
    json.dump({"transformers_already_imported": "transformers" in sys.modules}, handle)
'''


@pytest.mark.parametrize("backend", ["unsloth", "peft"])
def test_unsloth_is_imported_before_transformers_when_the_recipe_chooses_it(tmp_path, backend):
    """Unsloth patches transformers at import time; `dgemma-ft` imports it first for `backend: unsloth` recipes
    (a stand-in `unsloth` package records what was imported before it), and not at all otherwise."""
    import json
    import os
    import subprocess
    import sys

    package = tmp_path / "fake" / "unsloth"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_UNSLOTH)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: someone/model, backend: peft}\ntask: {name: sudoku}\n")
    marker = tmp_path / "marker.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "UNSLOTH_MARKER": str(marker)}
    subprocess.run([sys.executable, "-m", "dgemma_ft.cli", "check", str(recipe), "--set", f"model.backend={backend}"],
                   env=env, capture_output=True, text=True, timeout=120)
    if backend == "unsloth":
        assert json.loads(marker.read_text()) == {"transformers_already_imported": False}
    else:
        assert not marker.exists()


def test_unsloth_4bit_load_keeps_encoder_and_decoder_sharing(monkeypatch):
    """Unsloth's 4-bit path quantizes encoder and decoder linears as separate modules; after loading, the decoder
    must point at the encoder's modules so one shared adapter serves both passes (and can be merged)."""
    import copy
    import importlib.machinery
    import types

    import torch

    from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model

    model, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=48, head_dim=8, global_head_dim=8,
                                                 moe_intermediate_size=16, canvas_length=8))
    for enc_layer, dec_layer in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
        dec_layer.self_attn.q_proj = copy.deepcopy(enc_layer.self_attn.q_proj)  # as separate quantization leaves them
    seen = {}

    class FastDiffusionModel:  # Unsloth's DiffusionGemma loader: preferred over the generic FastModel
        @staticmethod
        def from_pretrained(**kwargs):
            seen.update(kwargs)
            return model, tokenizer

    class FastModel:
        @staticmethod
        def from_pretrained(**kwargs):
            pytest.fail("FastDiffusionModel should be used where Unsloth has it")

    fake = types.ModuleType("unsloth")
    fake.FastModel, fake.FastDiffusionModel = FastModel, FastDiffusionModel
    fake.__spec__ = importlib.machinery.ModuleSpec("unsloth", None)
    monkeypatch.setitem(__import__("sys").modules, "unsloth", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaded = load_model(ModelSection(name="someone/model", backend="unsloth", load_in_4bit=True, dtype="float32"))
    assert seen["load_in_4bit"] is True and seen["model_name"] == "someone/model"
    for enc_layer, dec_layer in zip(loaded.model.model.encoder.language_model.layers, loaded.model.model.decoder.layers):
        assert dec_layer.self_attn.q_proj is enc_layer.self_attn.q_proj
        assert dec_layer.mlp.down_proj is enc_layer.mlp.down_proj
