"""`dgemma-ft rl RECIPE.yaml`: reinforcement learning of one shared LoRA adapter from the task's validators, on the
model the recipe names (a run folder, full or LoRA, merged in memory; a merged folder; a Hub id), into the run
folder `train.output_dir`, laid out as `dgemma-ft RECIPE.yaml` lays it out (so `eval`, `merge`, `push` and
`--resume` work on it unchanged), plus RUN/reward_curve.png. Then the recipe's evaluation, with the starting
model beside the adapter (`rl.compare_base`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.atomic import atomic_write_text
from dgemma_ft.finetune.recipe import Recipe, load_recipe
from dgemma_ft.finetune.rl.config import RLConfig
from dgemma_ft.finetune.rl.curve import plot_reward_curve
from dgemma_ft.finetune.run import (build_task_data, is_main_process, parameter_counts, plan_run, prepare_model,
                                    run_trainer, save_final, save_from_checkpoint, training_device)
from dgemma_ft.finetune.model_loading import free_memory, preflight
from dgemma_ft.finetune.run_folder import checkpoint_step, claim
from dgemma_ft.inference.evaluate import answer_room
from dgemma_ft.output_paths import require_writable_dir


def rl_settings(recipe: Recipe) -> RLConfig:
    """The recipe's `rl:` section, refusing what RL here cannot do, each with the fix."""
    if recipe.rl is None:
        raise UserError("rl: the recipe has no 'rl:' section; add one (see recipes/sudoku-4x4-rl-tiny.yaml), or "
                        "train with `dgemma-ft RECIPE.yaml`")
    if recipe.finetune != "lora":
        raise UserError("finetune: dgemma-ft rl trains a LoRA adapter only (its reference model is the base with "
                        "the adapter off); set finetune: lora")
    if recipe.lora.dropout > 0:
        raise UserError(f"lora.dropout: dropout ({recipe.lora.dropout}) makes the new policy differ from the old "
                        f"one by chance, so the clipped ratio would not start at 1; set lora.dropout: 0 for rl")
    if recipe.task.train_also:  # rewards judge each prompt with the one training task
        raise UserError("task.train_also: rl draws its prompts from task.train alone; drop task.train_also (or "
                        "make one file of the prompts you want and name it in task.train)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("dgemma-ft rl runs in one process; start it without torchrun / accelerate launch")
    return recipe.rl


def as_training_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its `train` section carrying the RL updates, learning rate, warmup and accumulation, as
    the run-folder and Trainer helpers of `dgemma-ft RECIPE.yaml` read them (a constant rate after warmup)."""
    settings = recipe.rl
    train = recipe.train.model_copy(update={
        "steps": settings.steps, "lr": settings.lr, "min_lr": settings.lr, "warmup_steps": settings.warmup_steps,
        "schedule": "constant", "batch_size": 1, "grad_accum": settings.micro_batches})
    return recipe.model_copy(update={"train": train})


def train_rl(recipe: Recipe, resume: bool = False, console=None) -> tuple[Path, bool]:
    """Run RL as the recipe says; returns (run folder, whether anything was trained)."""
    settings = rl_settings(recipe)
    preflight(recipe.model)
    run_dir = Path(recipe.train.output_dir)
    say = console.print if console is not None else (lambda *a, **k: None)
    created = not run_dir.exists()
    require_writable_dir(run_dir, "train.output_dir")
    lock = claim(run_dir)
    try:
        state = plan_run(run_dir, settings.steps, resume, say)
        if state.kind == "finished":
            return run_dir, False
        if state.kind == "save_only":
            return save_from_checkpoint(as_training_recipe(recipe), run_dir, state.checkpoint, say), True
        return _train(recipe, run_dir, state.checkpoint, say), True
    except BaseException:
        if created and not (run_dir / "recipe.yaml").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before the run began: leave no empty folder
        raise
    finally:
        lock.release()


class PromptDraw:
    """Round r's prompts: `prompts_per_step` distinct training examples drawn with a generator seeded by
    (seed, r), so any round can be drawn again (after a resume) without replaying the rounds before it."""

    def __init__(self, dataset, count: int, seed: int):
        self.dataset, self.count, self.seed = dataset, min(count, len(dataset)), seed

    def __call__(self, round_index: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, round_index])
        return [dict(self.dataset[int(i)]) for i in rng.choice(len(self.dataset), self.count, replace=False)]


def _train(recipe: Recipe, run_dir: Path, checkpoint: Path | None, say) -> Path:
    # imported here: transformers' Trainer stack takes seconds to import, and `dgemma-ft check` imports the recipe
    # (which imports this package)

    from dgemma_ft.finetune.rl.rollouts import draw_rollouts
    from dgemma_ft.finetune.rl.trainer import BlockDiffusionGRPOTrainer, PassSchedule, RLProgress, one_item
    from dgemma_ft.finetune.trainer import JsonlLog, tensorboard_log, training_arguments
    from dgemma_ft.inference.run_eval import _longest_target

    settings = recipe.rl
    effective = as_training_recipe(recipe)
    device = training_device(recipe.model.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    data = build_task_data(recipe)
    if len(data.train) < settings.prompts_per_step:
        raise UserError(f"rl.prompts_per_step: {settings.prompts_per_step} prompts per rollout batch, but the "
                        f"training data has {len(data.train)}; lower it or raise task.train.size")
    say(f"[bold]task[/] {recipe.task.name}: {len(data.train)} training prompts"
        + (f", {len(data.eval)} evaluation examples (kept out of training)" if data.eval is not None else ""))
    model, tokenizer, loaded = prepare_model(recipe)
    trainable, total, counts = parameter_counts(model)
    say(f"[bold]model[/] {loaded.source}: {counts} "
        f"(LoRA); {settings.prompts_per_step} prompts x {settings.group_size} answers per rollout batch at "
        f"{settings.rollout_steps} denoising steps")
    canvas = loaded.model.config.canvas_length
    if recipe.eval.max_new_tokens:
        max_new = recipe.eval.max_new_tokens
    else:
        max_new = answer_room(_longest_target([dict(data.train[i]) for i in range(min(2000, len(data.train)))],
                                              tokenizer)[0], canvas)
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())

    prompts = PromptDraw(data.train, settings.prompts_per_step, recipe.train.seed)
    batch_size = recipe.eval.batch_size if isinstance(recipe.eval.batch_size, int) else 64

    def rollouts_for(round_index: int):
        return draw_rollouts(model, tokenizer, data.task, prompts(round_index), settings,
                             seed=recipe.train.seed * 1_000_003 + round_index, max_new_tokens=max_new,
                             batch_size=batch_size)

    use_cuda = device.type == "cuda"
    bf16 = use_cuda and torch.cuda.is_bf16_supported() and recipe.model.dtype in ("auto", "bfloat16")
    args = training_arguments(effective.train, run_dir, use_cuda, bf16)
    resume_step = checkpoint_step(checkpoint) if checkpoint else 0
    callbacks = [RLProgress(settings.answers_per_step), JsonlLog(run_dir / "logs" / "train_log.jsonl", resume_step),
                 tensorboard_log(run_dir / "logs")]
    trainer = BlockDiffusionGRPOTrainer(
        model=model, args=args, train_dataset=PassSchedule(settings.steps, settings.micro_batches),
        data_collator=one_item, processing_class=tokenizer, settings=settings, draw_rollouts=rollouts_for,
        seed=recipe.train.seed, callbacks=callbacks)
    result, seconds = run_trainer(trainer, model, checkpoint, run_dir)
    save_final(model, tokenizer, recipe, run_dir, loaded.base_name)
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    curve = plot_reward_curve(run_dir / "logs" / "train_log.jsonl", run_dir / "reward_curve.png")
    steps_run = settings.steps - resume_step
    summary = {"steps": settings.steps, "resumed_from_step": resume_step, "train_seconds": round(seconds, 1),
               "answers_per_second": round(steps_run * settings.answers_per_step / settings.inner_steps
                                           / max(seconds, 1e-9), 2),
               "train_loss": result.training_loss, "train_examples": len(data.train), "method": "rl",
               "trainable_parameters": trainable, "total_parameters": total, "base": loaded.base_name}
    atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    say(f"[bold green]trained[/] {steps_run} RL updates in {seconds:.0f} s; run folder: {run_dir}"
        + (f"; reward curve: {curve}" if curve else ""))
    del trainer, model, loaded  # release the trained model before the evaluation loads its copy
    free_memory()
    return run_dir


def rl_command(recipe_path: str | Path | Recipe, overrides: list[str] | None = None, resume: bool = False,
               evaluate: bool = True, device: str | None = None, console=None):
    """`dgemma-ft rl RECIPE.yaml`: RL, then (unless `evaluate` is False or eval.after_train is off) the recipe's
    evaluation of the adapter, with the starting model's rows when rl.compare_base. Returns (run folder, report
    or None)."""
    from dgemma_ft.inference import run_eval

    lines = list(overrides or []) + ([f"model.device={device}"] if device is not None else [])
    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(recipe_path, lines)
    if recipe.rl is None:
        rl_settings(recipe)  # the one-line error, before any model loads
    run_dir, trained = train_rl(recipe, resume=resume, console=console)
    report = None
    if evaluate and recipe.eval.after_train and recipe.task.eval is not None and is_main_process():
        existing = run_dir / "eval" / "report.json"
        if not trained and existing.exists():
            report = run_eval.read_report(run_dir / "eval")
            if console is not None:
                console.print(f"evaluation report of these weights: {run_dir / 'eval' / 'report.md'}",
                              highlight=False)
        else:
            report = run_eval.run_evaluation(run_dir, include_base=recipe.rl.compare_base, console=console,
                                             device=device)
    return run_dir, report
