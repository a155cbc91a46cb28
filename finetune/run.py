"""`dgemma-ft RECIPE.yaml`: build the task's data, load the model, attach LoRA (or train fully), train with the
block-diffusion objective, and save a run folder:

    RUN/recipe.yaml          the fully resolved recipe (a run folder is itself a valid `model.name`)
    RUN/adapter/ | RUN/model/  the LoRA adapter (standard PEFT folder) or the full weights, with the tokenizer
    RUN/checkpoints/         checkpoint-N folders (written atomically), for `--resume`
    RUN/logs/                TensorBoard events and train_log.jsonl
    RUN/trainer_state.json, RUN/train_summary.json
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.atomic import atomic_dir, atomic_write_text
from dgemma_ft.finetune.model_loading import free_memory, resolve_device
from dgemma_ft.finetune.recipe import Recipe
from dgemma_ft.plumbing import temperature_range
from dgemma_ft.tasks.base import SourceSpec, Task, get_task


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class TaskData:
    task: Task
    train: object  # datasets.Dataset
    eval: object | None


def build_task_data(recipe: Recipe, train_size: int | None = None) -> TaskData:
    """The task and its train/eval datasets, with every evaluation example kept out of training."""
    section = recipe.task
    task = get_task(section.name, section.options)
    eval_set = task.build_dataset("eval", section.eval) if section.eval is not None else None
    excluded: set[str] = set()
    if section.exclude_eval_from_train:
        if eval_set is not None:
            excluded |= {task.key(row) for row in eval_set}
        for source in section.exclude_sources:
            excluded |= {task.key(row) for row in task.build_dataset("eval", SourceSpec(source=source))}
    spec = section.train if train_size is None else section.train.model_copy(update={"size": train_size})
    train_set = task.build_dataset("train", spec, exclude_keys=excluded)
    overlap = excluded & {task.key(row) for row in train_set}
    if overlap:  # build_dataset excludes them; this guards the guarantee itself
        raise UserError(f"{len(overlap)} evaluation example(s) leaked into the training data")
    return TaskData(task=task, train=train_set, eval=eval_set)


def prepare_model(recipe: Recipe):
    """(model ready to train, tokenizer, LoadedModel)."""
    from dgemma_ft.finetune.lora import attach_lora
    from dgemma_ft.finetune.model_loading import load_model

    loaded = load_model(recipe.model)
    model = loaded.model
    if recipe.finetune == "lora":
        model = attach_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    else:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = not ("vision_tower" in name or "embed_vision" in name)
    return model, loaded.tokenizer, loaded


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a finished or started run."""
    from dgemma_ft.finetune.trainer import newest_checkpoint

    checkpoint = newest_checkpoint(run_dir / "checkpoints")
    if resume:
        if checkpoint is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
        return checkpoint
    if (run_dir / "recipe.yaml").exists() or checkpoint is not None:
        raise UserError(f"train.output_dir '{run_dir}' already holds a run; pass --resume to continue it, or "
                        f"choose another folder with --set train.output_dir=...")
    return None


def train(recipe: Recipe, resume: bool = False, console=None) -> Path:
    """Train as the recipe says and return the run folder."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dgemma_ft.finetune.data import BlockCollator, encode_dataset
    from dgemma_ft.finetune.distributed import unsharded_for_saving
    from dgemma_ft.finetune.trainer import (BlockDiffusionTrainer, JsonlLog, RichProgress, tensorboard_dir,
                                            training_arguments)

    run_dir = Path(recipe.train.output_dir)
    checkpoint = check_run_dir(run_dir, resume)
    device = training_device(recipe.model.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    say = console.print if console is not None and is_main_process() else (lambda *a, **k: None)

    data = build_task_data(recipe)
    say(f"[bold]task[/] {recipe.task.name}: {len(data.train)} training examples"
        + (f", {len(data.eval)} evaluation examples (kept out of training)" if data.eval is not None else ""))
    model, tokenizer, loaded = prepare_model(recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"[bold]model[/] {loaded.source}: {total / 1e6:.2f} M parameters, {trainable / 1e6:.3f} M trainable "
        f"({recipe.finetune})")
    canvas_length = loaded.model.config.canvas_length
    encoded = encode_dataset(data.train, tokenizer, canvas_length, recipe.train.max_blocks)

    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            resolved = recipe.model_copy(deep=True)
            atomic_write_text(run_dir / "recipe.yaml", resolved.to_yaml())

    use_cuda = device.type == "cuda"
    bf16 = use_cuda and torch.cuda.is_bf16_supported() and recipe.model.dtype in ("auto", "bfloat16")
    args = training_arguments(recipe.train, run_dir, use_cuda, bf16)
    examples_per_step = recipe.train.batch_size * recipe.train.grad_accum * max(1, args.world_size)
    objective = objective_config(recipe.train, loaded.model)
    resume_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    with tensorboard_dir(run_dir / "logs"):
        trainer = BlockDiffusionTrainer(
            model=model, args=args, train_dataset=encoded, data_collator=BlockCollator(tokenizer.pad_token_id),
            processing_class=tokenizer, objective=objective,
            callbacks=[RichProgress(examples_per_step), JsonlLog(run_dir / "logs" / "train_log.jsonl", resume_step)])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    model = unsharded_for_saving(trainer, model)  # under FSDP: gathers the weights (every process)
    if is_main_process():
        save_final(model, tokenizer, recipe, run_dir, loaded.base_name)
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        steps_run = recipe.train.steps - resume_step
        summary = {"steps": recipe.train.steps, "resumed_from_step": resume_step, "train_seconds": round(seconds, 1),
                   "examples_per_second": round(steps_run * examples_per_step / max(seconds, 1e-9), 2),
                   "train_loss": result.training_loss, "train_examples": len(data.train),
                   "trainable_parameters": trainable, "total_parameters": total, "base": loaded.base_name}
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
        say(f"[bold green]trained[/] {steps_run} steps in {seconds:.0f} s; run folder: {run_dir}")
    # release the trained model (the Trainer and its accelerator hold it in reference cycles) before anything
    # else, e.g. the evaluation that follows, loads another copy
    del trainer, model, loaded
    free_memory()
    return run_dir


def objective_config(train, model):
    """The objective's knobs from the recipe's `train` section (and the model's sampler temperatures)."""
    from dgemma_ft.finetune.objective import ObjectiveConfig

    temperatures = temperature_range(model) if train.self_conditioning_scale == "temperature" else None
    return ObjectiveConfig(eps=train.eps, self_conditioning_p=train.self_conditioning_p, ar_weight=train.ar_weight,
                           block_selection=train.block_selection, canvas_samples=train.canvas_samples,
                           self_conditioning_temperature=temperatures)


def training_device(name: str) -> torch.device:
    """The device this process trains on. Under `torchrun`/`accelerate launch` each process takes the GPU of its
    local rank, so the model is loaded straight onto it (not onto GPU 0 by every process)."""
    device = resolve_device(name)
    if device.type == "cuda":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # the Trainer's "cuda" is then this GPU
    return device


def save_final(model, tokenizer, recipe: Recipe, run_dir: Path, base_name: str | None = None) -> None:
    """The adapter (standard PEFT folder) or full weights, with the tokenizer, written atomically."""
    if recipe.finetune == "lora":
        from dgemma_ft.finetune.lora import save_adapter

        save_adapter(model, run_dir / "adapter", base_name)
        tokenizer.save_pretrained(str(run_dir / "adapter"))
    else:
        with atomic_dir(run_dir / "model") as staging:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
    shutil.rmtree(run_dir / "checkpoints" / ".staging", ignore_errors=True)
