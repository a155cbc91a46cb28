"""The `dgemma-ft` command. `dgemma-ft RECIPE.yaml` is short for `dgemma-ft train RECIPE.yaml`.

Each command calls its `dgemma_ft.api` function and prints what it returns. Every import inside a function here
is there to keep `dgemma-ft --help` fast: `dgemma_ft.api` brings torch and transformers, and help needs neither."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from dgemma_ft.errors import Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune DiffusionGemma (block diffusion) on structured tasks, and check its answers.")
console = Console(stderr=False)
err = Console(stderr=True)

SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key.sub=value")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="where the model runs: auto (the GPU when one "
                                                                      "is present), cpu, cuda, cuda:N, mps")]
INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (SIGINT)


@app.command()
def train(recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
          set_: SetOption = None,
          resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
          evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate after training")] = True,
          device: DeviceOption = None):
    """Train as RECIPE says, then evaluate the result on the recipe's eval set."""
    from dgemma_ft import api

    api.train(recipe, overrides=set_ or [], resume=resume, evaluate=evaluate, device=device)  # prints progress


@app.command()
def rl(recipe: Annotated[Path, typer.Argument(help="YAML recipe with an rl: section")],
       set_: SetOption = None,
       resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
       evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate after training")] = True,
       device: DeviceOption = None):
    """Reinforcement learning of a LoRA adapter from the task's validator (the recipe's rl: section), then evaluate."""
    from dgemma_ft.finetune.rl.run import rl_command

    rl_command(recipe, overrides=set_ or [], resume=resume, evaluate=evaluate, device=device, console=console)


@app.command()
def check(recipe: Annotated[Path, typer.Argument(help="YAML recipe")], set_: SetOption = None):
    """Validate RECIPE (keys, values, task options, data sources, model name) without training."""
    from dgemma_ft import api

    for line in api.check(recipe, overrides=set_ or []):
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # paths stay whole, brackets kept
    console.print("[bold green]ok[/]: the recipe is valid")


@app.command()
def estimate(
        recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
        set_: SetOption = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="training batch per device "
                                                                             "(default: the recipe's)")] = None,
        checkpointing: Annotated[Optional[bool], typer.Option("--checkpointing/--no-checkpointing",
                                                              help="gradient checkpointing (default: the "
                                                                   "recipe's)")] = None,
        prompt_tokens: Annotated[Optional[int], typer.Option("--prompt-tokens", help="longest prompt, in tokens "
                                                                                   "(default: measured on the "
                                                                                   "task)")] = None,
        response_tokens: Annotated[Optional[int], typer.Option("--response-tokens", help="longest response, in "
                                                                                       "tokens")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON (bytes)")] = False):
    """Plan the memory of RECIPE's training step and sampler, per GPU size, without downloading weights."""
    from dgemma_ft import api
    from dgemma_ft.finetune.estimate_report import render

    plan = api.estimate(recipe, overrides=set_ or [], batch_size=batch_size, checkpointing=checkpointing,
                        prompt_tokens=prompt_tokens, response_tokens=response_tokens)
    if as_json:
        typer.echo(plan.to_json())
        return
    for renderable in render(plan):
        console.print(renderable)


def _steps(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        steps = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--steps {value!r}: give comma-separated step counts, e.g. --steps 1,4,16,48") from None
    if not steps or any(s <= 0 for s in steps):
        raise UserError(f"--steps {value!r}: step counts must be positive, e.g. --steps 1,4,16,48")
    return steps


@app.command("eval")
def eval_command(
        target: Annotated[str, typer.Argument(help="run folder, recipe .yaml, or merged model folder")],
        adapter: Annotated[Optional[str], typer.Option(help="evaluate this PEFT adapter on the base")] = None,
        base: Annotated[bool, typer.Option("--base", help="also evaluate the base model, for comparison")] = False,
        data: Annotated[Optional[str], typer.Option(help="evaluation data: FILE or hf:owner/name[:config][@split]")]
        = None,
        limit: Annotated[Optional[int], typer.Option(help="evaluate the first N examples")] = None,
        steps: Annotated[Optional[str], typer.Option(help="denoising step counts, e.g. 1,4,16,48")] = None,
        pin: Annotated[Optional[bool], typer.Option("--pin/--no-pin", help="hold the task's known tokens")] = None,
        renoise: Annotated[Optional[bool], typer.Option("--renoise/--no-renoise",
                                                        help="send validator-flagged tokens back to noise")] = None,
        both: Annotated[bool, typer.Option("--compare", help="run every pin x renoise combination")] = False,
        batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="examples per batch, or auto (the "
                                                                             "largest that fits)")] = None,
        seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,
        out: Annotated[Optional[Path], typer.Option(help="report folder (default: TARGET/eval for the recipe's "
                                                         "evaluation, TARGET/evals/NAME for a partial one)")] = None,
        device: DeviceOption = None):
    """Evaluate a model on its task and write report.md, report.json, predictions.jsonl and plots.

    The recipe's evaluation (task.eval, eval.limit, eval.steps/pin/renoise/seed) writes TARGET/eval: the card shows it.

    Partial: --adapter, --data, --limit below the set, --steps/--pin/--renoise/--seed unlike the recipe, --compare.

    A partial one writes TARGET/evals/NAME (e.g. evals/limit-2_steps-1), unless --out says where; TARGET/eval stays.

    --base (adds the base model's rows), --batch-size and --device keep an evaluation full."""
    from dgemma_ft import api

    api.evaluate(target, adapter=adapter, base=base, data=data, limit=limit, steps=_steps(steps), pin=pin,
                 renoise=renoise, compare=both, batch_size=_batch_size(batch_size), seed=seed, out=out,
                 device=device)  # prints progress and the results table


def _batch_size(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) <= 0:
        raise UserError(f"--batch-size {value!r}: give a positive number of examples, or auto")
    return int(value)


@app.command()
def generate(
        target: Annotated[str, typer.Argument(help="run folder, recipe .yaml, or merged model folder")],
        prompt: Annotated[Optional[str], typer.Option(help="a free-text prompt")] = None,
        example: Annotated[Optional[int], typer.Option(help="answer example N of the eval data, with its verdict")]
        = None,
        steps: Annotated[Optional[int], typer.Option(help="max denoising steps per block (default: the "
                                                          "recipe's largest eval.steps)")] = None,
        pin: Annotated[bool, typer.Option("--pin/--no-pin")] = True,
        renoise: Annotated[bool, typer.Option("--renoise/--no-renoise")] = False,
        seed: Annotated[int, typer.Option()] = 0,
        trace: Annotated[Optional[str], typer.Option(help="save the denoising trace: a .png or .gif file")]
        = None,
        data: Annotated[Optional[str], typer.Option(help="data for --example (default: the recipe's eval)")] = None,
        adapter: Annotated[Optional[str], typer.Option(help="a PEFT adapter on the base")] = None,
        device: DeviceOption = None):
    """Answer one prompt and print the answer (and its verdict for --example)."""
    from dgemma_ft import api

    result = api.generate(target, prompt=prompt, example=example, steps=steps, pin=pin, renoise=renoise, seed=seed,
                          trace=trace, data=data, adapter=adapter, device=device)
    # the texts are escaped: a model's answer (or a prompt) like `[true]` or `[/]` is text, not rich markup
    console.print(f"[bold]prompt[/]\n{escape(result.prompt)}", highlight=False)
    console.print(f"[bold]answer[/]\n{escape(result.text)}", highlight=False)
    if result.verdict is not None:
        verdict = result.verdict
        colour = "green" if verdict["correct"] else "red"
        console.print(f"[bold {colour}]{'correct' if verdict['correct'] else 'wrong'}[/] "
                      f"(score {verdict['score']:.2f}): {escape(verdict['reason'])}", highlight=False)
    stats = result.stats
    console.print(f"{stats['denoising_steps']} denoising steps, {stats['decoder_forwards']} decoder forwards, "
                  f"{stats['tokens_per_forward']} tokens/forward" + (f"; trace: {result.trace}"
                                                                      if result.trace is not None else ""),
                  markup=False)


@app.command()
def merge(
        source: Annotated[Path, typer.Argument(help="run folder (its adapter/ is folded into the base its recipe "
                                                    "names; a full run's model/ is re-saved)")],
        out: Annotated[Path, typer.Option("--out", "-o", help="new folder for the merged checkpoint")],
        dtype: Annotated[str, typer.Option(help="saved precision: bfloat16, float16 or float32")] = "bfloat16",
        force: Annotated[bool, typer.Option("--force", help="replace --out if it already exists")] = False,
        untie: Annotated[bool, typer.Option("--untie", help="for an adapter whose encoder and decoder weights "
                                                          "differ: save untied encoder/decoder weights "
                                                          "(a larger checkpoint)")] = False,
        device: DeviceOption = None):
    """Fold a run's LoRA adapter into its base and save a standard checkpoint (+ tokenizer, recipe.yaml)."""
    from dgemma_ft import api

    result = api.merge(source, out, dtype=dtype, force=force, untie=untie, device=device)
    total, out = sum(result.files.values()), escape(str(result.out))
    console.print(f"[bold green]merged[/] ({result.layout} adapter, {result.dtype}"
                  f"{', untied' if result.untied else ''}): {out} ({total / 2**20:.1f} MiB); "
                  f"evaluate it with `dgemma-ft eval {out}`", highlight=False)


@app.command()
def push(
        folder: Annotated[Path, typer.Argument(help="run folder (pushes its adapter/ or model/) or merged folder")],
        repo: Annotated[str, typer.Option("--repo", help="Hub model id, e.g. your-name/sudoku-dgemma")],
        private: Annotated[bool, typer.Option("--private", help="create the repo as private")] = False,
        adapter_only: Annotated[bool, typer.Option("--adapter-only",
                                                   help="for a merged folder: push the adapter of the run it "
                                                        "came from instead")] = False,
        revision: Annotated[Optional[str], typer.Option(help="push to this branch (created if missing)")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="print the card and the file list; upload "
                                                                "nothing")] = False,
        force: Annotated[bool, typer.Option("--force", help="upload even if the repo already has files")] = False,
        token: Annotated[Optional[str], typer.Option(help="Hub token (default: `hf auth login` or HF_TOKEN)")]
        = None):
    """Publish to the Hugging Face Hub with a model card (eval table, recipe, training figures, usage)."""
    from dgemma_ft import api

    result = api.push(folder, repo, private=private, adapter_only=adapter_only, revision=revision,
                      dry_run=dry_run, force=force, token=token)
    if not result.dry_run:
        console.print(f"[bold green]pushed[/] {len(result.files)} files: {result.url}", highlight=False)


COMMANDS = {"train", "rl", "check", "estimate", "eval", "generate", "merge", "push", "--help", "-h"}


def _quiet_library_progress() -> None:
    """The kit shows its own rich progress; silence the per-file bars of datasets/transformers (they flood logs)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _import_backend_first(argv: list[str]) -> None:
    """Unsloth must be imported before transformers: do it now if the command's recipe (a .yaml, or a run or
    merged folder's recipe.yaml) chooses `model.backend: unsloth`."""
    from dgemma_ft.finetune.model_loading import import_backend_first

    if len(argv) < 2 or argv[1].startswith("-"):
        return
    target = Path(argv[1])
    recipe = target / "recipe.yaml" if target.is_dir() else target
    overrides = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--set"]
    import_backend_first(recipe, overrides)


def _asks_for_help(argv: list[str]) -> bool:
    """Help (no arguments, or --help anywhere) only prints text: no library need be imported or quieted."""
    return not argv or "--help" in argv or "-h" in argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not _asks_for_help(argv):
        _import_backend_first(argv)
        _quiet_library_progress()
    try:
        # in non-standalone mode click returns (not raises) the exit code, e.g. typer's 130 for Ctrl-C
        code = app(argv, prog_name="dgemma-ft", standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except Interrupted as exc:
        err.print(str(exc), style="bold yellow", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(INTERRUPTED) from None
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        raise SystemExit(INTERRUPTED) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, (click.exceptions.Abort, typer.Abort)):
            raise SystemExit(1) from None
        # click's, or those of the copy of click that typer >= 0.2x ships (typer.TyperException)
        usage_errors = (click.exceptions.ClickException, getattr(typer, "TyperException", click.ClickException))
        if isinstance(exc, usage_errors) and hasattr(exc, "show"):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
    if isinstance(code, int) and code != 0:
        if code == INTERRUPTED:
            err.print("interrupted", highlight=False)
        raise SystemExit(code)


if __name__ == "__main__":
    main()
