"""`dgemma-ft eval` and `dgemma-ft generate` (and `dgemma_ft.evaluate` / `dgemma_ft.generate`): resolve what to
evaluate (a run folder, a recipe, a merged model folder, optionally an adapter and the base beside it), run every
setting, write the reports, and return them (a `Report`, a `Generation`)."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dgemma_ft import __version__
from dgemma_ft.chat import prompt_ids, split_answer
from dgemma_ft.errors import UserError
from dgemma_ft.finetune import model_loading  # used as a module: tests patch model_loading.load_model
from dgemma_ft.finetune.lora import load_adapter
from dgemma_ft.finetune.model_loading import free_memory, is_run_folder, require_finished_run
from dgemma_ft.finetune.recipe import ExtraEval, Recipe, load_recipe, source_options
from dgemma_ft.inference.constraints import special_token_ids
from dgemma_ft.inference.evaluate import (Setting, answer_room, check_prompt_fits, evaluate_setting, make_requests,
                                          position_limit)
from dgemma_ft.inference.report import plot_trace, save_trace_gif, write_png, write_report
from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig
from dgemma_ft.output_paths import require_writable_dir, require_writable_file
from dgemma_ft.tasks import SourceSpec, get_task

MERGED_RECIPE = "recipe.yaml"  # merged model folders keep the recipe of the run they came from


class Report(dict):
    """An evaluation's report: the contents of its report.json, and `folder`, where report.md, report.json,
    predictions.jsonl and the plots were written."""

    def __init__(self, data: dict, folder: Path):
        super().__init__(data)
        self.folder = Path(folder)


def read_report(folder: str | Path) -> Report:
    """The report an earlier evaluation wrote into `folder`."""
    return Report(json.loads((Path(folder) / "report.json").read_text(encoding="utf-8")), folder)


@dataclass
class Generation:
    """One answer from `generate`: the prompt, the decoded answer, the sampler's statistics, the task's verdict
    (for an example of the eval data) and the trace file (when one was asked for)."""

    prompt: str
    text: str
    stats: dict  # denoising_steps, decoder_forwards, tokens_per_forward
    verdict: dict | None = None  # correct, score, reason, ...
    trace: Path | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.verdict is None else bool(self.verdict["correct"])


@dataclass
class EvalTarget:
    recipe: Recipe
    label: str
    out_dir: Path
    load: Callable[[], tuple]  # -> (model, tokenizer)
    load_base: Callable[[], tuple] | None
    training_log: Path | None
    kind: str = "trained"  # how the report names the model under test: trained, adapter, merged, base
    keep_out: list[tuple[Path, bool]] = field(default_factory=list)  # (folder, and its inside?) reports avoid


def _loader(section, merge_adapter: bool = False, adapter: str | None = None):
    def load():
        loaded = model_loading.load_model(section, merge_adapter=merge_adapter)
        model = loaded.model
        if adapter is not None:
            model = load_adapter(model, adapter)
        return model.eval(), loaded.tokenizer

    return load


def _load_recipe_on(source: Path | Recipe, device: str | None) -> Recipe:
    """The recipe at `source` (or a copy of a `Recipe` object), with its model placed on `device` when one is
    given (`--device`)."""
    recipe = source.model_copy(deep=True) if isinstance(source, Recipe) else load_recipe(source)
    if device is not None:
        recipe.model.device = device
    return recipe


def resolve_target(target: str | Path | Recipe, adapter: str | None = None, device: str | None = None,
                   command: str = "eval") -> EvalTarget:
    """What `eval TARGET [--adapter PATH] [--device D]` means; a `Recipe` object means what its .yaml would.
    `command` (eval, generate) starts the error line for a target that is none of these."""
    resolved = _resolve(target, adapter, device, command)
    resolved.keep_out = _model_folders(resolved, adapter)
    return resolved


def _model_folders(resolved: EvalTarget, adapter: str | None) -> list[tuple[Path, bool]]:
    """(folder, whether its inside counts too) that reports must not be written into: the run or merged folder
    itself, and the weights, adapter and checkpoints that train, merge and push read."""
    folder = resolved.out_dir.parent
    found = [(Path(adapter), True)] if adapter is not None else []
    if is_run_folder(folder):
        found += [(folder, False)] + [(folder / name, True) for name in ("adapter", "model", "checkpoints")]
    elif resolved.kind == "merged":
        found.append((folder, False))
    return found


def _resolve(target: str | Path | Recipe, adapter: str | None, device: str | None, command: str) -> EvalTarget:
    path = None if isinstance(target, Recipe) else Path(target)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there; point it at a PEFT adapter folder "
                        f"(e.g. RUN/adapter)")
    if path is None or path.suffix in (".yaml", ".yml"):
        recipe = _load_recipe_on(target if path is None else path, device)
        run_dir = Path(recipe.train.output_dir)
        if adapter is None and is_run_folder(run_dir):
            return _resolve(run_dir, None, device, command)
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
        require_finished_run(path)  # a run whose adapter/ or model/ is gone says so, not "not a run folder"
        raise UserError(f"{command}: '{target}' is neither a run folder (recipe.yaml + adapter/ or model/), a recipe "
                        f".yaml, nor a merged model folder with its {MERGED_RECIPE}")
    raise UserError(f"{command}: '{target}' does not exist; give a run folder, a recipe .yaml or a merged model folder")


@dataclass
class _EvalSet:
    """One data set an evaluation measures: the recipe's task.eval (or --data), or one of its eval.also sets."""

    task: object
    spec: SourceSpec
    source_label: str  # how error lines name it
    examples: list[dict]
    full_examples: int | None
    out: Path
    entry: ExtraEval | None = None  # the eval.also entry, for an extra set
    results: list = field(default_factory=list)


def run_evaluation(target: str | Path | Recipe, adapter: str | None = None, include_base: bool = False,
                   data: str | None = None, limit: int | None = None, steps: list[int] | None = None,
                   pin: bool | None = None, renoise: bool | None = None, batch_size: int | str | None = None,
                   out_dir: str | Path | None = None, seed: int | None = None, console=None,
                   compare: bool = False, device: str | None = None) -> Report:
    """Evaluate and write the reports; returns the report (report.json's contents, with the folder it is in).
    The recipe's own evaluation writes TARGET/eval; anything else (see `differences_from_recipe`) writes
    TARGET/evals/NAME unless `out_dir` is given, so a quick check never replaces the full report that the model
    card shows. The recipe's own evaluation also measures the base when eval.base is on (and a base is known),
    and each eval.also set, written to TARGET/evals/NAME (OUT/evals/NAME with `out_dir`) and summed up in the
    main report. With a `console`, shows progress and prints the results tables."""
    _check_eval_options(limit, steps, batch_size)
    if out_dir is not None:
        require_writable_dir(out_dir, "--out")  # before any data is read or model loaded
    resolved = resolve_target(target, adapter, device)
    recipe = resolved.recipe
    spec, source_label = _eval_source(recipe, data, _named(target))
    own_data = spec is recipe.task.eval
    task = get_task(recipe.task.name, source_options(recipe, "eval") if own_data else recipe.task.options)
    everything = [dict(row) for row in task.build_dataset("eval", spec)]
    examples = everything[:limit or recipe.eval.limit or len(everything)]
    step_list = steps or recipe.eval.steps
    pins = [True, False] if compare else [recipe.eval.pin] if pin is None else [pin]
    renoises = [False, True] if compare else [recipe.eval.renoise] if renoise is None else [renoise]
    seed = recipe.eval.seed if seed is None else seed
    batch = batch_size or recipe.eval.batch_size
    full_examples = len(everything[:recipe.eval.limit or len(everything)]) if own_data else None
    differences = differences_from_recipe(recipe, adapter=adapter, data=None if own_data else data,
                                          limit=limit, examples=len(examples), full_examples=full_examples,
                                          steps=step_list, pins=pins, renoises=renoises, seed=seed,
                                          compare=compare)
    out = _report_folder(resolved, out_dir, differences)
    main = _EvalSet(task, spec, source_label, examples, full_examples, out)
    # the recipe's own evaluation measures what its eval section lists; a partial one only what was asked
    extras = [] if differences else _extra_sets(recipe, resolved, out_dir)

    models = [(resolved.kind, resolved.load)]
    if include_base and resolved.load_base is None:
        raise UserError(f"--base: no base model is known for '{_named(target)}'")
    with_base = include_base or (not differences and recipe.eval.base and resolved.load_base is not None)
    if with_base:
        models.append(("base", resolved.load_base))
    tokenizer = None
    sampler_defaults: dict = {}
    for name, load in models:
        model, tokenizer = load()
        rooms = []
        for each in (main, *extras):  # every set's prompts fit, before any is evaluated
            rooms.append(_answer_tokens(recipe, each.examples, tokenizer, model, each.source_label))
            _check_prompts(each.examples, tokenizer, model, rooms[-1], each.source_label)
        sampler_defaults = sampler_defaults or vars(SamplerConfig.from_model(model))
        for each, max_new in zip((main, *extras), rooms):
            title = None if each.entry is None else each.entry.name
            for steps_count in step_list:
                for pin_on in pins:
                    for renoise_on in renoises:
                        setting = Setting(steps=steps_count, pin=pin_on, renoise=renoise_on, model=name)
                        each.results.append(_run_with_progress(model, tokenizer, each.task, each.examples, setting,
                                                               batch, seed, max_new, console, title))
        del model
        free_memory()  # before the next model (e.g. the base for comparison) loads
    record = functools.partial(_evaluation_record, steps=step_list, pins=pins, renoises=renoises, seed=seed,
                               include_base=with_base)
    also = []
    for each in extras:
        header = {"target": resolved.label, "task": recipe.task.name, "data": each.spec.source,
                  "options": each.entry.options, "examples": len(each.examples), "seed": seed,
                  "evaluation": record([], len(each.examples), len(each.examples), extra=each.entry,
                                       summary=_relative(out / "report.md", each.out)),
                  "training": _training_summary(resolved)}
        written = write_report(each.out, header, each.results, sampler_defaults, resolved.training_log, tokenizer)
        also += [{"name": each.entry.name, "data": each.spec.source, "options": each.entry.options,
                  **{key: row[key] for key in ALSO_FIGURES}, "report": _relative(each.out / "report.md", out)}
                 for row in written["results"]]
    report_header = {"target": resolved.label, "task": recipe.task.name, "data": spec.source,
                     "examples": len(examples), "seed": seed,
                     "evaluation": record(differences, len(examples), full_examples),
                     "training": _training_summary(resolved), **({"also": also} if extras else {})}
    report = Report(write_report(out, report_header, main.results, sampler_defaults, resolved.training_log,
                                 tokenizer), out)
    if console is not None:
        _print_summary(console, report["results"], f"{recipe.task.name} on {spec.source} ({len(examples)} examples)")
        for each in extras:
            _print_summary(console, [r for r in also if r["name"] == each.entry.name],
                           f"eval.also '{each.entry.name}': {each.spec.source} ({len(each.examples)} examples)")
        _print_written(console, out, differences, [each.out for each in extras])
    return report


ALSO_FIGURES = ("model", "steps", "pin", "renoise", "correct", "examples", "solve_rate", "tokens_per_forward",
                "examples_per_second")  # what the main report keeps of each eval.also row


def _extra_sets(recipe: Recipe, resolved: EvalTarget, out_dir) -> list[_EvalSet]:
    """The recipe's eval.also sets, each with its own task options, examples and report folder (checked before
    any model loads): TARGET/evals/NAME, or OUT/evals/NAME for a full evaluation written to --out."""
    sets = []
    for index, entry in enumerate(recipe.eval.also):
        task = get_task(recipe.task.name, source_options(recipe, index))
        spec = entry.source_spec()
        everything = [dict(row) for row in task.build_dataset("eval", spec)]
        examples = everything[:entry.limit or recipe.eval.limit or len(everything)]
        root = Path(out_dir) if out_dir is not None else resolved.out_dir.parent
        folder = root / "evals" / entry.name
        _refuse_model_folders(folder, resolved)
        require_writable_dir(folder, f"eval.also[{index}] ('{entry.name}'): its report folder")
        sets.append(_EvalSet(task, spec, f"eval.also[{index}] '{entry.name}' ('{spec.source}')", examples,
                             len(examples), folder, entry=entry))
    return sets


def _relative(path: Path, start: Path) -> str:
    """`path` as a link from a report in the folder `start` (forward slashes, as markdown links are)."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _check_eval_options(limit, steps, batch_size) -> None:
    """What `eval` takes from the command line or the API, checked before anything is read or loaded."""
    if limit is not None and not is_count(limit):
        raise UserError("--limit must be a positive number of examples")
    if steps is not None and (not isinstance(steps, (list, tuple)) or not steps or not all(map(is_count, steps))):
        raise UserError(f"--steps {steps!r}: step counts must be positive, e.g. --steps 1,4,16,48")
    if batch_size is not None and batch_size != "auto" and not is_count(batch_size):
        raise UserError(f"--batch-size {batch_size!r}: give a positive number of examples, or auto")


def is_count(value) -> bool:
    """A positive whole number (not a boolean, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _named(target) -> str:
    """How error lines name what is evaluated: the path given, or the run a `Recipe` object trains."""
    return f"the recipe of {target.train.output_dir}" if isinstance(target, Recipe) else str(target)


def _print_summary(console, rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("model", "steps", "pin", "renoise", "solved", "rate", "tok/fwd", "ex/s"):
        table.add_column(column)
    for s in rows:
        table.add_row(s["model"], str(s["steps"]), "on" if s["pin"] else "off", "on" if s["renoise"] else "off",
                      f"{s['correct']}/{s['examples']}", f"{s['solve_rate']:.1%}", f"{s['tokens_per_forward']:.2f}",
                      f"{s['examples_per_second']:.1f}")
    console.print(table)


def _print_written(console, out: Path, differences: list[str], extra_folders: list[Path]) -> None:
    if differences:
        console.print(f"partial evaluation ({', '.join(differences)}): the recipe's full report is left as it was",
                      highlight=False, markup=False)
    console.print(f"reports written to {out}/ (report.md, report.json, predictions.jsonl, plots)", highlight=False)
    for folder in extra_folders:
        console.print(f"eval.also: reports written to {folder}/", highlight=False)


# ------------------------------------------------------------------------------------ which evaluation this is
def _eval_source(recipe: Recipe, data: str | None, target) -> tuple[SourceSpec, str]:
    """The eval data and how error lines name it. `--data` naming the recipe's own eval source is that source
    (with its size and columns), so it stays the recipe's evaluation."""
    own = recipe.task.eval
    if data is not None and (own is None or data != own.source):
        return SourceSpec(source=data), f"--data '{data}'"
    if own is None:
        raise UserError(f"{target}: the recipe has no task.eval source; pass --data FILE|hf:owner/name")
    return own, f"task.eval '{own.source}'"


def differences_from_recipe(recipe: Recipe, *, adapter: str | None, data: str | None, limit: int | None,
                            examples: int, full_examples: int | None, steps: list[int], pins: list[bool],
                            renoises: list[bool], seed: int, compare: bool) -> list[str]:
    """The options that make this evaluation differ from the recipe's (task.eval, eval.limit, eval.steps,
    eval.pin, eval.renoise, eval.seed, on the model under test); empty for the recipe's full evaluation.
    --base (adds the base model's rows), --batch-size and --device (answers do not depend on them) keep it full."""
    wanted = recipe.eval
    found = []
    if adapter is not None:
        found.append(f"--adapter {adapter}")
    if data is not None:
        found.append(f"--data {data}")
    if (data is not None and limit is not None) or (full_examples is not None and examples != full_examples):
        found.append(f"--limit {examples if limit is None else limit}")
    if sorted(steps) != sorted(wanted.steps):
        found.append("--steps " + ",".join(str(s) for s in steps))
    if compare:
        found.append("--compare")
    else:
        if pins != [wanted.pin]:
            found.append("--pin" if pins[0] else "--no-pin")
        if renoises != [wanted.renoise]:
            found.append("--renoise" if renoises[0] else "--no-renoise")
    if seed != wanted.seed:
        found.append(f"--seed {seed}")
    return found


def partial_folder_name(differences: list[str]) -> str:
    """A folder name that says what was changed, e.g. 'limit-2_steps-1' or 'data-numbers_no-pin'."""
    parts = []
    for item in differences:
        flag, _, value = item.lstrip("-").partition(" ")
        if flag in ("data", "adapter"):
            path = Path(value.split("@")[0])
            value = path.parent.name if path.name == "adapter" and path.parent.name else path.stem or path.name
        parts.append(f"{flag}-{value}" if value else flag)
    name = re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts).replace(",", "-")).strip("-.")
    return (name or "partial")[:80]


def _report_folder(resolved: EvalTarget, out_dir, differences: list[str]) -> Path:
    """Where the reports go: `--out`, else TARGET/eval for the recipe's evaluation, else TARGET/evals/NAME."""
    if out_dir is not None:
        out = Path(out_dir)
    elif differences:
        out = resolved.out_dir.parent / "evals" / partial_folder_name(differences)
    else:
        out = resolved.out_dir
    _refuse_model_folders(out, resolved)
    return require_writable_dir(out, "--out" if out_dir is not None else "the report folder")


def _refuse_model_folders(out: Path, resolved: EvalTarget) -> None:
    """Reports must not land among weights that train, merge and push read (push uploads every top-level file)."""
    where = out.resolve()
    for folder, inside in resolved.keep_out:
        folder = folder.resolve()
        if where == folder or (inside and folder in where.parents):
            raise UserError(f"--out {out}: this would write reports into '{folder}', which holds the model's files; "
                            f"choose a folder outside it, or leave --out off for the default")


def _evaluation_record(differences: list[str], examples: int, full_examples: int | None, steps: list[int],
                       pins: list[bool], renoises: list[bool], seed: int, include_base: bool,
                       extra: ExtraEval | None = None, summary: str | None = None) -> dict:
    """What report.json says about itself, so the model card can say which evaluation it shows. An eval.also
    set's report says it is the recipe's extra evaluation NAME (scope "also"), with its options and where the
    recipe's report (`summary`) sums it up."""
    scope = "also" if extra is not None else "partial" if differences else "full"
    named = {"name": extra.name, "options": extra.options, "limit": extra.limit, "summary": summary} if extra else {}
    return {"scope": scope, **named, "differences": differences, "examples": examples,
            "full_examples": full_examples, "steps": list(steps), "pin": pins, "renoise": renoises, "seed": seed,
            "base_compared": include_base, "written_by": f"dgemma-ft {__version__} eval",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


# --------------------------------------------------------------------------------------------- prompt lengths
def _answer_tokens(recipe: Recipe, examples, tokenizer, model, source_label: str) -> int:
    """Answer tokens the sampler may write: eval.max_new_tokens when set, else the longest reference answer (of
    the first 2000 examples) plus its end token, rounded up to whole canvases; no canvas is added and nothing is
    capped. Refused when the canvases this needs take every position the model reads (max_position_embeddings)."""
    if recipe.eval.max_new_tokens:
        max_new, cause = recipe.eval.max_new_tokens, f"eval.max_new_tokens ({recipe.eval.max_new_tokens})"
    else:
        longest, index = _longest_target(examples, tokenizer)
        max_new = answer_room(longest, model.config.canvas_length)
        cause = f"the longest reference answer ({source_label}, example {index}: {longest - 1:,} tokens)"
    limit = position_limit(model)
    room = answer_room(max_new, model.config.canvas_length)
    if limit is not None and room >= limit:
        raise UserError(f"{cause} needs {room:,} answer positions, but the model reads at most {limit:,} "
                        f"(max_position_embeddings); shorten or remove it, or set eval.max_new_tokens lower")
    return max_new


def _check_prompts(examples: list[dict], tokenizer, model, max_new: int, source_label: str) -> None:
    """Every prompt must fit the model's positions with the answer's room, before the sampler allocates."""
    limit = position_limit(model)
    room = answer_room(max_new, model.config.canvas_length)
    for index, example in enumerate(examples):
        check_prompt_fits(len(prompt_ids(tokenizer, example["messages"])), room, limit,
                          f"{source_label}: the prompt of example {index} (counting from 0, as `generate "
                          f"--example` does)", fix="shorten or remove that example")


def _longest_target(examples, tokenizer) -> tuple[int, int]:
    """(tokens of the longest reference answer + 1 for its end, its index), over the first 2000 examples."""
    longest, where = 0, 0
    for index, example in enumerate(examples[:2000]):
        target = split_answer(example["messages"])[1] or ""
        tokens = len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1
        if tokens > longest:
            longest, where = tokens, index
    return longest, where


def _run_with_progress(model, tokenizer, task, examples, setting, batch, seed, max_new, console, title=None):
    if console is None:
        return evaluate_setting(model, tokenizer, task, examples, setting, batch, seed, max_new, trace_index=0)
    label = setting.label if title is None else f"{title}: {setting.label}"
    with Progress(TextColumn(f"[bold]eval[/] {label}"), BarColumn(), MofNCompleteColumn(),
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


TRACE_SUFFIXES = (".png", ".gif")


def generate_one(target: str | Path | Recipe, prompt: str | None = None, example: int | None = None,
                 steps: int | None = None, pin: bool = True, renoise: bool = False, seed: int = 0,
                 trace: str | Path | None = None, data: str | None = None, adapter: str | None = None,
                 device: str | None = None) -> Generation:
    """Answer one prompt (free text, or example N of the eval data with its verdict); optionally save a trace.
    Every option is checked before the model loads."""
    if (prompt is None) == (example is None):
        raise UserError("generate: give exactly one of --prompt TEXT or --example N")
    if steps is not None and not is_count(steps):
        raise UserError(f"--steps {steps}: --steps must be a positive number of denoising steps, e.g. --steps 16")
    trace_path = require_writable_file(trace, "--trace", TRACE_SUFFIXES) if trace else None
    resolved = resolve_target(target, adapter, device, command="generate")
    recipe = resolved.recipe
    own_data = not data or (recipe.task.eval is not None and data == recipe.task.eval.source)
    task = get_task(recipe.task.name, source_options(recipe, "eval") if own_data else recipe.task.options)
    chosen, source_label = _chosen_example(task, recipe, data, example) if example is not None else (None, "")
    model, tokenizer = resolved.load()
    if chosen is not None:
        request, what = _example_request(task, chosen, tokenizer, seed), f"--example {example} of {source_label}"
        max_new = _answer_tokens(recipe, [chosen], tokenizer, model, source_label)
    else:
        request, what = _prompt_request(prompt, tokenizer, seed), "--prompt"
        max_new = recipe.eval.max_new_tokens or model.config.canvas_length * 4
        pin = renoise = False
    room = answer_room(max_new, model.config.canvas_length)
    check_prompt_fits(len(request.prompt_ids), room, position_limit(model), f"{what}: the prompt")
    config = SamplerConfig.from_model(model, max_denoising_steps=steps or max(recipe.eval.steps),
                                      max_new_tokens=max_new)
    sampler = BlockDiffusionSampler(model, config, special_token_ids=special_token_ids(tokenizer))
    generation = sampler.generate([request], pin=pin, renoise=renoise, trace_index=0)[0]
    text = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    result = Generation(prompt=prompt if prompt is not None else chosen["messages"][0]["content"], text=text,
                        stats={"denoising_steps": generation.steps, "decoder_forwards": generation.forwards,
                               "tokens_per_forward": round(generation.tokens_per_forward, 3)},
                        verdict=task.validate(chosen, text).to_dict() if chosen is not None else None)
    if trace_path is not None:
        _save_trace(trace_path, generation.trace, tokenizer, (result.verdict or {}).get("reason", ""))
        result.trace = trace_path
    return result


def _chosen_example(task, recipe: Recipe, data: str | None, example: int) -> tuple[dict, str]:
    """Example N of the eval data (`--data`, else the recipe's task.eval), and how error lines name its source."""
    spec = SourceSpec(source=data) if data else recipe.task.eval
    if spec is None:
        raise UserError("generate --example: the recipe has no task.eval source; pass --data")
    dataset = task.build_dataset("eval", spec)
    if not 0 <= example < len(dataset):
        raise UserError(f"--example {example}: the eval data has {len(dataset)} examples (0..{len(dataset) - 1})")
    return dict(dataset[example]), (f"--data '{data}'" if data else f"task.eval '{spec.source}'")


def _example_request(task, chosen: dict, tokenizer, seed: int):
    request = make_requests(task, [chosen], tokenizer, seed)[0]
    request.seed = seed
    return request


def _prompt_request(prompt: str, tokenizer, seed: int):
    return Request(prompt_ids=prompt_ids(tokenizer, [{"role": "user", "content": prompt}]), seed=seed)


def _save_trace(path: Path, trace: list[dict], tokenizer, title: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        save_trace_gif(trace, tokenizer, path)
    else:
        write_png(path, plot_trace(trace, tokenizer, title=title))
