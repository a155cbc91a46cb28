"""`dgemma-ft check`: everything that can be verified about a recipe without training."""

from __future__ import annotations

from pathlib import Path

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.recipe import load_recipe

SAMPLE = 64  # training examples built to check that targets fit the canvas


def check_recipe(path: str | Path, overrides: list[str]) -> list[str]:
    """Lines describing what was checked; raises `UserError` at the first problem."""
    from dgemma_ft.finetune.data import encode_example
    from dgemma_ft.finetune.model_loading import is_run_folder
    from dgemma_ft.finetune.run import build_task_data

    recipe = load_recipe(path, overrides)
    lines = [f"recipe {path}: keys and values valid"]
    data = build_task_data(recipe, train_size=min(SAMPLE, recipe.task.train.size or SAMPLE))
    lines.append(f"task {recipe.task.name}: options valid; train source '{recipe.task.train.source}' readable"
                 + (f"; eval source '{recipe.task.eval.source}' gives {len(data.eval)} examples"
                    if data.eval is not None else ""))
    name = recipe.model.name
    if name == "tiny":
        from dgemma_ft.finetune.tiny import build_tiny_tokenizer

        tokenizer, canvas = build_tiny_tokenizer(), recipe.model.tiny.canvas_length
    elif is_run_folder(name) or Path(name).exists():
        tokenizer, canvas = _local_tokenizer_and_canvas(name)
    else:
        lines.append(f"model {name}: a Hub id (not downloaded by check)")
        return lines
    for row in data.train:
        encode_example(tokenizer, row["messages"], canvas, recipe.train.max_blocks)
    lines.append(f"model {name}: tokenizer loads; {len(data.train)} sample targets fit canvases of {canvas}")
    return lines


def _local_tokenizer_and_canvas(name: str):
    import json

    from transformers import AutoTokenizer

    from dgemma_ft.finetune.model_loading import is_run_folder

    folder = Path(name)
    if is_run_folder(folder):
        folder = folder / ("model" if (folder / "model").is_dir() else "adapter")
    config_file = folder / "config.json"
    if not config_file.exists() and is_run_folder(name):
        from dgemma_ft.finetune.recipe import load_recipe as load

        base = load(Path(name) / "recipe.yaml").model
        canvas = base.tiny.canvas_length if base.name == "tiny" else _local_tokenizer_and_canvas(base.name)[1]
        return AutoTokenizer.from_pretrained(str(folder)), canvas
    if not config_file.exists():
        raise UserError(f"model.name: '{name}' has no config.json; point it at a saved model or run folder")
    canvas = json.loads(config_file.read_text()).get("canvas_length", 256)
    return AutoTokenizer.from_pretrained(str(folder)), canvas
