"""`dgemma-ft check`: everything that can be verified about a recipe without training, so that what training would
fail on (an unwritable output folder, sizes the model cannot run, a broken model or run folder, a backend this
machine lacks) fails here first, as one line."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.data import encode_example
from dgemma_ft.finetune.lora import check_adapter_folder
from dgemma_ft.finetune.model_loading import (inspect_model_folder, preflight, read_run_recipe, run_base_chain,
                                              run_base_kind)
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import build_task_data
from dgemma_ft.finetune.tiny import build_tiny_model
from dgemma_ft.output_paths import require_writable_dir

SAMPLE = 64  # training examples built to check that targets fit the canvas


def check_recipe(path: str | Path, overrides: list[str]) -> list[str]:
    """Lines describing what was checked; raises `UserError` at the first problem."""
    recipe, run = _read(Path(path), overrides)
    return check_loaded(recipe, f"recipe {path}", run)


def check_loaded(recipe, name: str, run: Path | None = None) -> list[str]:
    """`check_recipe` for a recipe already read and validated (e.g. built in Python), named `name`."""
    lines = [f"{name}: keys and values valid", _check_output_dir(recipe.train.output_dir)]
    if run is not None:  # `check RUN`: the run's own result must load too (as `eval RUN` and model.name: RUN do)
        lines.append(check_model(recipe.model.model_copy(update={"name": str(run)}))[0])
    model_line, tokenizer, canvas = check_model(recipe.model)
    data = build_task_data(recipe, train_size=min(SAMPLE, recipe.task.train.size or SAMPLE))
    lines.append(f"task {recipe.task.name}: options valid; train source '{recipe.task.train.source}' readable"
                 + (f"; eval source '{recipe.task.eval.source}' gives {len(data.eval)} examples"
                    if data.eval is not None else "")
                 + "".join(f"; eval.also '{name}' gives {len(rows)} examples" for name, rows in data.also.items())
                 + (f"; {len(recipe.task.train_also)} more training source(s) mixed in (task.train_also)"
                    if recipe.task.train_also else ""))
    if canvas is None:
        lines.append(model_line)
        return lines
    for row in data.train:
        encode_example(tokenizer, row["messages"], canvas, recipe.train.max_blocks)
    lines.append(f"{model_line}; {len(data.train)} sample targets fit canvases of {canvas}")
    return lines


def _read(path: Path, overrides: list[str]):
    """(recipe, run folder or None): a recipe file, or a run folder (its recipe.yaml); a folder without one, a
    binary file or an unreadable one is one line."""
    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise UserError(f"check: '{path}' is a folder without recipe.yaml; give a recipe .yaml or a run folder")
        return read_run_recipe(path, overrides), path
    return load_recipe(path, overrides), None  # which refuses unreadable, binary and non-UTF-8 files itself


def _check_output_dir(output_dir: str) -> str:
    """Training writes here at its end too: a file in the way or a read-only place must fail now."""
    path = require_writable_dir(output_dir, "train.output_dir")
    note = (" (it already holds a run: training needs --resume, or another folder)"
            if (path / "recipe.yaml").exists() else "")
    return f"train.output_dir '{output_dir}': writable{note}"


def check_model(section) -> tuple[str, object | None, int | None]:
    """(line, tokenizer, canvas length) for the recipe's model, checked as far as possible without loading
    weights: the backend, the name, a folder's config, weights and tokenizer, a run folder's recipes, the tiny
    sizes. Tokenizer and canvas are None for a Hub id (nothing is downloaded)."""
    line, tokenizer, canvas = _check_model(section)
    return line, tokenizer, section.canvas_length or canvas  # model.canvas_length overrides the checkpoint's


def _check_model(section) -> tuple[str, object | None, int | None]:
    kind = preflight(section)  # what `load_model` checks first, in training too
    name = section.name
    if kind == "tiny":
        _, tokenizer = build_tiny_model(section.tiny)  # tiny by design; a forward checks the sizes run
        return "model tiny: builds and runs", tokenizer, section.tiny.canvas_length
    if kind == "hub":
        return f"model {name}: a Hub id (not downloaded by check)", None, None
    if kind == "run":
        tokenizer, canvas = _run_tokenizer_and_canvas(Path(name).expanduser())
        hub = "" if canvas is not None else " (its base is a Hub id, not downloaded by check)"
        return f"model {name}: run folder readable{hub}", tokenizer, canvas
    tokenizer, canvas = _folder_tokenizer_and_canvas(Path(name).expanduser(), f"model.name '{name}'")
    return f"model {name}: config, weights and tokenizer readable", tokenizer, canvas


def _folder_tokenizer_and_canvas(folder: Path, label: str):
    """A saved model folder: its config (checked by transformers too) and its tokenizer."""
    config = inspect_model_folder(folder, label)
    _parse_config(folder, label)
    return _tokenizer(folder, label), config.get("canvas_length", 256)


def _run_tokenizer_and_canvas(run: Path):
    """A run folder: every recipe down its chain of bases reads; each saved model/ or adapter/ is complete; the
    canvas is that of the nearest full weights (None when the chain ends at a Hub id, which check does not
    download)."""
    chain = run_base_chain(run)
    canvas = None
    for folder, recipe in chain:
        if (folder / "model").is_dir():
            canvas = _folder_tokenizer_and_canvas(folder / "model", f"run folder '{folder}': model/")[1]
            break
        check_adapter_folder(folder / "adapter", run=folder)
        base = recipe.model
        if base.canvas_length is not None:  # the adapter was trained (and is loaded) at this canvas
            canvas = base.canvas_length
            break
        kind = run_base_kind(folder, base.name)
        if kind == "tiny":
            canvas = base.tiny.canvas_length
        elif kind == "folder":
            label = f"run folder '{folder}': its base '{base.name}'"
            canvas = _folder_tokenizer_and_canvas(Path(base.name).expanduser(), label)[1]
    saved = run / ("model" if (run / "model").is_dir() else "adapter")
    return _tokenizer(saved, f"run folder '{run}': {saved.name}/"), canvas


def _parse_config(folder: Path, label: str) -> None:
    """transformers' own reading of config.json: values it rejects (e.g. sizes that do not divide) fail here."""
    try:
        AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{label}: {folder / 'config.json'} has values transformers rejects "
                        f"({(str(exc) or type(exc).__name__).splitlines()[0]}); fix or re-save it") from None


def _tokenizer(folder: Path, label: str):
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{label}: the tokenizer in '{folder}' does not load "
                        f"({(str(exc) or type(exc).__name__).splitlines()[0]}); re-save it with the model") from None
