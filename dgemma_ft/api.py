"""The Python API: what the `dgemma-ft` commands do, as functions that return what they made instead of printing
it. The CLI is a thin layer over these; a notebook uses them directly:

    from dgemma_ft import Recipe, evaluate, generate, merge, train

    recipe = Recipe.load("sudoku-4x4-tiny.yaml", overrides={"train.steps": 100})
    run = train(recipe)                             # RunResult: run_dir, report, summary
    report = evaluate(run, limit=50, steps=[1, 16])  # report.json's contents; report.folder
    print(generate(run, example=0).text)
    merged = merge(run, "runs/merged")               # MergeResult: out, layout, files, ...

A target (what `evaluate`, `generate`, `merge` and `push` work on) is a `RunResult`, a `MergeResult`, a
`Recipe` (its run once trained, else its base model), or a path: a run folder, a recipe .yaml, a merged folder.
Every mistake raises `dgemma_ft.errors.UserError` with the one line the CLI prints. With
`model.backend: unsloth`, import unsloth first in the notebook (its patches must precede transformers).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import datasets
import transformers
import yaml
from pydantic import ValidationError
from rich.console import Console

from dgemma_ft.errors import UserError
from dgemma_ft.finetune import recipe as recipes
from dgemma_ft.finetune import run as training
from dgemma_ft.finetune.check import check_loaded, check_recipe
from dgemma_ft.finetune.estimate import MemoryPlan
from dgemma_ft.finetune.estimate import estimate as plan_memory
from dgemma_ft.finetune.merge import MergeResult
from dgemma_ft.finetune.merge import merge as merge_run
from dgemma_ft.finetune.push import PushResult
from dgemma_ft.finetune.push import push as push_folder
from dgemma_ft.inference import run_eval
from dgemma_ft.inference.run_eval import Generation, Report, is_count

__all__ = ["Recipe", "RunResult", "Report", "Generation", "MergeResult", "PushResult", "MemoryPlan", "train",
           "evaluate", "generate", "merge", "push", "check", "estimate"]

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
Overrides = Union[Mapping[str, Any], Iterable[str], str, None]


class Recipe(recipes.Recipe):
    """A validated recipe: the pydantic model the YAML files fill (`recipe.train.steps`, `recipe.to_yaml()`);
    assigning a field validates it. Overrides are `{"train.steps": 50}` (Python values) or `["train.steps=50"]`
    (YAML text, as `--set` takes it)."""

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Overrides = None) -> Recipe:
        """The recipe file at `path` (or a shipped recipe by name, e.g. "sudoku-4x4-tiny.yaml"), overridden."""
        return _as_api_recipe(recipes.load_recipe(path, override_lines(overrides)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Overrides = None, name: str = "recipe") -> Recipe:
        """A recipe from its sections (model, task, lora, train, eval), as its YAML would hold them; error lines
        start with `name` where a file's would start with its path and line."""
        if not isinstance(data, Mapping):
            raise UserError(f"{name}: a recipe is a mapping of sections (model, task, lora, train, eval), not a "
                            f"{type(data).__name__}")
        plain = recipes.apply_overrides(_plain(data), override_lines(overrides))
        try:
            recipe = cls.model_validate(plain, context={"this_machine": True})
        except ValidationError as exc:
            raise UserError(recipes.format_validation_error(exc, name, "")) from None
        recipes._check_columns(recipe, name, "")  # the check load_recipe makes after validating
        return recipe


def _as_api_recipe(recipe: recipes.Recipe) -> Recipe:
    """The same validated recipe as this module's `Recipe` (no second validation)."""
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.model_construct(_fields_set=set(recipe.model_fields_set), **dict(recipe))


def override_lines(overrides: Overrides) -> list[str]:
    """`--set` lines for overrides given as {"train.steps": 50} or ["train.steps=50"] (or one such string)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={_yaml_text(key, value)}" for key, value in overrides.items()]
    lines = list(overrides)
    for line in lines:
        if not isinstance(line, str):
            raise UserError(f"overrides: {line!r} is not 'key.sub=value' text; give a dict {{'key.sub': value}} "
                            f"or a list of 'key.sub=value' strings")
    return lines


def _yaml_text(key: str, value: Any) -> str:
    """`value` as the YAML that `--set` parses back to the same value."""
    try:
        text = yaml.safe_dump(_plain(value), default_flow_style=True, width=2**30)
    except yaml.YAMLError:
        raise UserError(f"overrides {key!r}: a recipe cannot hold {type(value).__name__} values; give numbers, "
                        f"text, booleans, lists or dicts") from None
    return text.removesuffix("...\n").strip()


def _plain(value: Any) -> Any:
    """Recipe data as YAML would hold it: paths as text, tuples as lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


RecipeLike = Union[recipes.Recipe, Mapping[str, Any], str, os.PathLike]


def _recipe(recipe: RecipeLike, lines: list[str]) -> recipes.Recipe:
    """A validated recipe from a `Recipe`, a dict of sections or a recipe file, with `--set` lines applied."""
    if isinstance(recipe, recipes.Recipe):
        return Recipe.from_dict(recipe.model_dump(mode="json"), lines) if lines else recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe, lines)
    return Recipe.load(recipe, lines)


@dataclass
class RunResult:
    """What `train` made: the run folder, the evaluation report (None when it did not evaluate) and the training
    summary (train_summary.json). It is path-like: it goes wherever a run folder's path goes."""

    run_dir: Path
    report: Report | None = field(repr=False)
    summary: dict | None = field(repr=False)

    def __fspath__(self) -> str:
        return str(self.run_dir)


Target = Union[RunResult, MergeResult, recipes.Recipe, Mapping[str, Any], str, os.PathLike]


def _target(target: Target) -> recipes.Recipe | str | os.PathLike:
    """A target as run_eval and the folder commands take it: a path, or a recipe object."""
    if isinstance(target, RunResult):
        return target.run_dir
    if isinstance(target, MergeResult):
        return target.out
    if isinstance(target, Mapping):
        return Recipe.from_dict(target)
    return target


def _folder(target: Target) -> str | os.PathLike:
    """The folder `merge` and `push` read: a recipe stands for the run it trains."""
    target = _target(target)
    return Path(target.train.output_dir) if isinstance(target, recipes.Recipe) else target


def _device(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or not DEVICE_PATTERN.match(value)):
        raise UserError(f"--device {value!r}: give auto, cpu, cuda, cuda:N or mps")
    return value


def _console(quiet: bool) -> Console | None:
    return None if quiet else Console()


def _say(console: Console | None):
    """The `say` callback of merge and push: each message as plain text (no rich markup), or nothing."""
    if console is None:
        return None
    return lambda message: console.print(message, markup=False, highlight=False, soft_wrap=True)


def _without_library_bars(function: Callable) -> Callable:
    """Run `function` with datasets' and transformers' per-file progress bars off (as the CLI runs), restoring
    them after: the kit shows its own progress, and theirs floods a log or a notebook cell."""
    @functools.wraps(function)
    def quiet_bars(*args, **kwargs):
        hf_logging = transformers.utils.logging
        datasets_on, transformers_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
        try:
            return function(*args, **kwargs)
        finally:
            if datasets_on:
                datasets.enable_progress_bars()
            if transformers_on:
                hf_logging.enable_progress_bar()

    return quiet_bars


def _path_text(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)


# ------------------------------------------------------------------------------------------------- commands
@_without_library_bars
def train(recipe: RecipeLike, *, overrides: Overrides = None, resume: bool = False, evaluate: bool = True,
          device: str | None = None, quiet: bool = False) -> RunResult:
    """Train as `recipe` says (a `Recipe`, a dict of sections, or a recipe file) and then, unless `evaluate` is
    False or the recipe's eval.after_train is off, evaluate the result on its eval set (`dgemma-ft RECIPE`).
    `resume` continues from the newest checkpoint; a finished run returns at once, with its report. `device`:
    auto, cpu, cuda, cuda:N or mps. `quiet` hides the kit's messages and the evaluation's progress (the
    trainer still draws its progress bar)."""
    lines = override_lines(overrides) + ([f"model.device={_device(device)}"] if device is not None else [])
    recipe = _recipe(recipe, lines)
    console = _console(quiet)
    run_dir = Path(training.train(recipe, resume=resume, console=console))  # after releasing the trained model
    report = None
    if evaluate and recipe.eval.after_train and recipe.task.eval is not None and training.is_main_process():
        if _report_is_current(run_dir):  # a finished run resumed: nothing was trained, nothing to re-evaluate
            report = run_eval.read_report(run_dir / "eval")
            if console is not None:
                console.print(f"evaluation report of these weights: {run_dir / 'eval' / 'report.md'}",
                              highlight=False)
        else:
            report = run_eval.run_evaluation(run_dir, console=console, device=device)
    summary = run_dir / "train_summary.json"
    return RunResult(run_dir, report, json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else None)


def _report_is_current(run_dir: Path) -> bool:
    report, summary = run_dir / "eval" / "report.json", run_dir / "train_summary.json"
    return report.exists() and summary.exists() and report.stat().st_mtime >= summary.stat().st_mtime


@_without_library_bars
def evaluate(target: Target, *, adapter: str | os.PathLike | None = None, base: bool = False,
             data: str | os.PathLike | None = None, limit: int | None = None, steps: int | list[int] | None = None,
             pin: bool | None = None, renoise: bool | None = None, compare: bool = False,
             batch_size: int | str | None = None, seed: int | None = None, out: str | os.PathLike | None = None,
             device: str | None = None, quiet: bool = False) -> Report:
    """Evaluate `target` on its task and write report.md, report.json, predictions.jsonl and plots
    (`dgemma-ft eval`); returns the report (report.json's contents; `.folder` is where it was written).

    The recipe's own evaluation writes TARGET/eval; `adapter`, `data`, a smaller `limit`, or `steps`, `pin`,
    `renoise`, `seed` unlike the recipe's, or `compare` (every pin x renoise pair) make a partial one, written
    to TARGET/evals/NAME unless `out` says where. `base` adds the base model's rows (the recipe's eval.base adds
    them to its full evaluation); the full evaluation also measures the recipe's eval.also sets, each written to
    TARGET/evals/NAME and summed up in the report's `also` list. `batch_size` (or "auto") and `device` change
    no answer. `quiet` hides progress and the results table."""
    return run_eval.run_evaluation(
        _target(target), adapter=_path_text(adapter), include_base=base, data=_path_text(data), limit=limit,
        steps=[steps] if isinstance(steps, int) else steps, pin=pin, renoise=renoise, batch_size=batch_size,
        out_dir=out, seed=seed, console=_console(quiet), compare=compare, device=_device(device))


@_without_library_bars
def generate(target: Target, prompt: str | None = None, *, example: int | None = None, steps: int | None = None,
             pin: bool = True, renoise: bool = False, seed: int = 0, trace: str | os.PathLike | None = None,
             data: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
             device: str | None = None) -> Generation:
    """Answer one free-text `prompt`, or `example` N of the eval data (`data`, else the recipe's) with the task's
    verdict (`dgemma-ft generate`). `steps`: max denoising steps per block (default: the recipe's largest
    eval.steps); `trace`: save every denoising step as a .png or .gif."""
    return run_eval.generate_one(_target(target), prompt=prompt, example=example, steps=steps, pin=pin,
                                 renoise=renoise, seed=seed, trace=trace, data=_path_text(data),
                                 adapter=_path_text(adapter), device=_device(device))


@_without_library_bars
def merge(run: Target, out: str | os.PathLike, *, dtype: str = "bfloat16", force: bool = False,
          untie: bool = False, device: str | None = None, quiet: bool = False) -> MergeResult:
    """Fold a run's LoRA adapter into its base (a full run's model/ is re-saved) as a standard checkpoint in
    `out`, with the tokenizer and recipe.yaml (`dgemma-ft merge`). `force` replaces `out`; `untie` saves
    separate encoder/decoder weights for an adapter whose two sides differ."""
    return merge_run(_folder(run), out, dtype=dtype, force=force, untie=untie, say=_say(_console(quiet)),
                     device=_device(device))


def push(folder: Target, repo: str, *, private: bool = False, adapter_only: bool = False,
         revision: str | None = None, dry_run: bool = False, force: bool = False, token: str | None = None,
         quiet: bool = False) -> PushResult:
    """Publish a run (its adapter/ or model/) or a merged folder to the Hub repo `repo` with a model card
    (`dgemma-ft push`); `.url` is the repo's address. `dry_run` uploads nothing (`.card` and `.files` say what
    would go); `force` uploads over files the repo already has; `token` defaults to `hf auth login`/HF_TOKEN."""
    return push_folder(_folder(folder), repo, private=private, adapter_only=adapter_only, revision=revision,
                       dry_run=dry_run, force=force, token=token, say=_say(_console(quiet)))


@_without_library_bars
def check(recipe: RecipeLike | RunResult, *, overrides: Overrides = None) -> list[str]:
    """Check everything about a recipe (or a run folder's) that can be checked without training: keys and values,
    the output folder, task options and data sources, the model (`dgemma-ft check`). Returns what was checked,
    one line each; raises `UserError` at the first problem."""
    lines = override_lines(overrides)
    if isinstance(recipe, (str, os.PathLike)):
        return check_recipe(os.fspath(recipe), lines)
    return check_loaded(_recipe(recipe, lines), "recipe")


@_without_library_bars
def estimate(recipe: RecipeLike, *, overrides: Overrides = None, batch_size: int | None = None,
             checkpointing: bool | None = None, prompt_tokens: int | None = None,
             response_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of the recipe's training step and sampler, per GPU size, from the model's config alone
    (`dgemma-ft estimate`); `.to_dict()` has every figure, in bytes."""
    for name, value in (("--batch-size", batch_size), ("--prompt-tokens", prompt_tokens),
                        ("--response-tokens", response_tokens)):
        if value is not None and not is_count(value):
            raise UserError(f"{name} must be a positive number")
    return plan_memory(_recipe(recipe, override_lines(overrides)), batch_size=batch_size,
                       checkpointing=checkpointing, prompt_tokens=prompt_tokens, response_tokens=response_tokens)
