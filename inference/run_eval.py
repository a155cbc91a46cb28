"""`dgemma-ft eval` and `dgemma-ft generate`: resolve what to evaluate (a run folder, a recipe, a merged model
folder, optionally an adapter and the base beside it), run every setting, and write the reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.model_loading import free_memory, is_run_folder
from dgemma_ft.finetune.recipe import Recipe, load_recipe
from dgemma_ft.inference.evaluate import Setting, evaluate_setting
from dgemma_ft.inference.report import write_report
from dgemma_ft.tasks.base import SourceSpec, get_task

MERGED_RECIPE = "recipe.yaml"  # merged model folders keep the recipe of the run they came from


@dataclass
class EvalTarget:
    recipe: Recipe
    label: str
    out_dir: Path
    load: Callable[[], tuple]  # -> (model, tokenizer)
    load_base: Callable[[], tuple] | None
    training_log: Path | None
    kind: str = "trained"  # how the report names the model under test: trained, adapter, merged, base


def _loader(section, merge_adapter: bool = False, adapter: str | None = None):
    def load():
        from dgemma_ft.finetune.lora import load_adapter
        from dgemma_ft.finetune.model_loading import load_model

        loaded = load_model(section, merge_adapter=merge_adapter)
        model = loaded.model
        if adapter is not None:
            model = load_adapter(model, adapter)
        return model.eval(), loaded.tokenizer

    return load


def _load_recipe_on(path: Path, device: str | None) -> Recipe:
    """The recipe at `path`, with its model placed on `device` when one is given (`--device`)."""
    recipe = load_recipe(path)
    if device is not None:
        recipe.model.device = device
    return recipe


def resolve_target(target: str | Path, adapter: str | None = None, device: str | None = None) -> EvalTarget:
    """What `eval TARGET [--adapter PATH] [--device D]` means."""
    path = Path(target)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there; point it at a PEFT adapter folder "
                        f"(e.g. RUN/adapter)")
    if path.suffix in (".yaml", ".yml"):
        recipe = _load_recipe_on(path, device)
        run_dir = Path(recipe.train.output_dir)
        if adapter is None and is_run_folder(run_dir):
            return resolve_target(run_dir, device=device)
        base_section = recipe.model
        return EvalTarget(recipe, label=str(adapter or recipe.model.name), out_dir=run_dir / "eval",
                          load=_loader(base_section, adapter=adapter),
                          load_base=_loader(base_section) if adapter else None, training_log=None,
                          kind="adapter" if adapter else "base")
    if is_run_folder(path):
        recipe = _load_recipe_on(path / "recipe.yaml", device)
        run_section = recipe.model.model_copy(update={"name": str(path)})
        base = recipe.model if recipe.finetune == "lora" else None
        if adapter is not None:
            return EvalTarget(recipe, label=str(adapter), out_dir=path / "eval",
                              load=_loader(recipe.model, adapter=adapter), load_base=_loader(recipe.model),
                              training_log=None, kind="adapter")
        return EvalTarget(recipe, label=str(path), out_dir=path / "eval", load=_loader(run_section),
                          load_base=_loader(base) if base is not None else _loader(recipe.model),
                          training_log=path / "logs" / "train_log.jsonl",
                          kind="adapter" if recipe.finetune == "lora" else "trained")
    if (path / "config.json").is_file() and (path / MERGED_RECIPE).is_file():
        recipe = _load_recipe_on(path / MERGED_RECIPE, device)
        section = recipe.model.model_copy(update={"name": str(path), "tiny": recipe.model.tiny})
        return EvalTarget(recipe, label=str(path), out_dir=path / "eval", load=_loader(section),
                          load_base=None, training_log=None, kind="merged")
    if path.exists():
        raise UserError(f"eval: '{target}' is neither a run folder (recipe.yaml + adapter/ or model/), a recipe "
                        f".yaml, nor a merged model folder with its {MERGED_RECIPE}")
    raise UserError(f"eval: '{target}' does not exist; give a run folder, a recipe .yaml or a merged model folder")


def run_evaluation(target: str | Path, adapter: str | None = None, include_base: bool = False,
                   data: str | None = None, limit: int | None = None, steps: list[int] | None = None,
                   pin: bool | None = None, renoise: bool | None = None, batch_size: int | None = None,
                   out_dir: str | Path | None = None, seed: int | None = None, console=None,
                   compare: bool = False, device: str | None = None) -> dict:
    """Evaluate and write the reports; returns the report dict."""
    resolved = resolve_target(target, adapter, device)
    recipe = resolved.recipe
    task = get_task(recipe.task.name, recipe.task.options)
    if data is not None:
        spec = SourceSpec(source=data)
    elif recipe.task.eval is not None:
        spec = recipe.task.eval
    else:
        raise UserError(f"{target}: the recipe has no task.eval source; pass --data FILE|hf:owner/name")
    dataset = task.build_dataset("eval", spec)
    examples = [dict(row) for row in dataset]
    limit = limit or recipe.eval.limit
    if limit:
        examples = examples[:limit]
    step_list = steps or recipe.eval.steps
    pins = [True, False] if compare else [recipe.eval.pin] if pin is None else [pin]
    renoises = [False, True] if compare else [recipe.eval.renoise] if renoise is None else [renoise]
    seed = recipe.eval.seed if seed is None else seed
    batch = batch_size or recipe.eval.batch_size
    out = Path(out_dir) if out_dir is not None else resolved.out_dir

    models = [(resolved.kind, resolved.load)]
    if include_base:
        if resolved.load_base is None:
            raise UserError(f"--base: no base model is known for '{target}'")
        models.append(("base", resolved.load_base))
    from dgemma_ft.inference.sampling import SamplerConfig

    results = []
    tokenizer = None
    sampler_defaults: dict = {}
    for name, load in models:
        model, tokenizer = load()
        sampler_defaults = sampler_defaults or vars(SamplerConfig.from_model(model))
        max_new = recipe.eval.max_new_tokens or _default_max_new_tokens(task, examples, tokenizer, model)
        for steps_count in step_list:
            for pin_on in pins:
                for renoise_on in renoises:
                    setting = Setting(steps=steps_count, pin=pin_on, renoise=renoise_on, model=name)
                    results.append(_run_with_progress(model, tokenizer, task, examples, setting, batch, seed,
                                                      max_new, console))
        del model
        free_memory()  # before the next model (e.g. the base for comparison) loads
    report_header = {"target": resolved.label, "task": recipe.task.name, "data": spec.source,
                     "examples": len(examples), "seed": seed,
                     "training": _training_summary(resolved)}
    report = write_report(out, report_header, results, sampler_defaults, resolved.training_log, tokenizer)
    if console is not None:
        from rich.table import Table

        table = Table(title=f"{recipe.task.name} on {spec.source} ({len(examples)} examples)")
        for column in ("model", "steps", "pin", "renoise", "solved", "rate", "tok/fwd", "ex/s"):
            table.add_column(column)
        for s in report["results"]:
            table.add_row(s["model"], str(s["steps"]), "on" if s["pin"] else "off", "on" if s["renoise"] else "off",
                          f"{s['correct']}/{s['examples']}", f"{s['solve_rate']:.1%}", f"{s['tokens_per_forward']:.2f}",
                          f"{s['examples_per_second']:.1f}")
        console.print(table)
        console.print(f"reports written to {out}/ (report.md, report.json, predictions.jsonl, plots)")
    return report


def _default_max_new_tokens(task, examples, tokenizer, model) -> int:
    """Enough canvases for the longest reference target (+1 canvas), capped by the model's default."""
    canvas = model.config.canvas_length
    longest = 0
    for example in examples[:2000]:
        target = example["messages"][-1]["content"] if example["messages"][-1]["role"] == "assistant" else ""
        longest = max(longest, len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1)
    blocks = max(1, -(-longest // canvas))
    return blocks * canvas


def _run_with_progress(model, tokenizer, task, examples, setting, batch, seed, max_new, console):
    if console is None:
        return evaluate_setting(model, tokenizer, task, examples, setting, batch, seed, max_new, trace_index=0)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]eval[/] {setting.label}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("solved {task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        bar = progress.add_task("eval", total=len(examples), rate="-")

        def update(done: int, correct: int) -> None:
            progress.update(bar, completed=done, rate=f"{correct / max(done, 1):.1%}")

        return evaluate_setting(model, tokenizer, task, examples, setting, batch, seed, max_new, progress=update,
                                trace_index=0)


def _training_summary(resolved: EvalTarget) -> dict | None:
    if resolved.training_log is None:
        return None
    summary = resolved.training_log.parent.parent / "train_summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def generate_one(target: str | Path, prompt: str | None = None, example: int | None = None,
                 steps: int | None = None, pin: bool = True, renoise: bool = False, seed: int = 0,
                 trace: str | None = None, data: str | None = None, adapter: str | None = None,
                 device: str | None = None) -> dict:
    """Answer one prompt (free text, or example N of the eval data with its verdict); optionally save a trace."""
    from dgemma_ft.inference.constraints import special_token_ids
    from dgemma_ft.inference.evaluate import make_requests
    from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig

    if (prompt is None) == (example is None):
        raise UserError("generate: give exactly one of --prompt TEXT or --example N")
    resolved = resolve_target(target, adapter, device)
    recipe = resolved.recipe
    task = get_task(recipe.task.name, recipe.task.options)
    model, tokenizer = resolved.load()
    chosen = None
    if example is not None:
        spec = SourceSpec(source=data) if data else recipe.task.eval
        if spec is None:
            raise UserError("generate --example: the recipe has no task.eval source; pass --data")
        dataset = task.build_dataset("eval", spec)
        if not 0 <= example < len(dataset):
            raise UserError(f"--example {example}: the eval data has {len(dataset)} examples (0..{len(dataset) - 1})")
        chosen = dict(dataset[example])
        request = make_requests(task, [chosen], tokenizer, seed)[0]
        request.seed = seed
    else:
        from dgemma_ft.finetune.data import prompt_ids

        request = Request(prompt_ids=prompt_ids(tokenizer, [{"role": "user", "content": prompt}]), seed=seed)
        pin = renoise = False
    max_new = recipe.eval.max_new_tokens or (
        _default_max_new_tokens(task, [chosen], tokenizer, model) if chosen else model.config.canvas_length * 4)
    config = SamplerConfig.from_model(model, max_denoising_steps=steps or max(recipe.eval.steps),
                                      max_new_tokens=max_new)
    generation = BlockDiffusionSampler(model, config, special_token_ids=special_token_ids(tokenizer)).generate([request], pin=pin, renoise=renoise,
                                                               trace_index=0)[0]
    text = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    result = {"prompt": prompt if prompt is not None else chosen["messages"][0]["content"], "output": text,
              "stats": {"denoising_steps": generation.steps, "decoder_forwards": generation.forwards,
                        "tokens_per_forward": round(generation.tokens_per_forward, 3)}}
    if chosen is not None:
        result["verdict"] = task.validate(chosen, text).to_dict()
    if trace:
        from dgemma_ft.inference.report import _write_png, plot_trace, save_trace_gif

        trace_path = Path(trace)
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        if trace_path.suffix.lower() == ".gif":
            save_trace_gif(generation.trace, tokenizer, trace_path)
        else:
            _write_png(trace_path, plot_trace(generation.trace, tokenizer,
                                              title=result.get("verdict", {}).get("reason", "")))
        result["trace"] = str(trace_path)
    return result
