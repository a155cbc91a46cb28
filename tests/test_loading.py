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
