"""`dgemma-ft RECIPE.yaml`: build the task's data, load the model, attach LoRA (or train fully), train with the
block-diffusion objective, and save a run folder:

    RUN/recipe.yaml          the fully resolved recipe (a run folder is itself a valid `model.name`)
    RUN/adapter/ | RUN/model/  the LoRA adapter (standard PEFT folder) or the full weights, with the tokenizer
    RUN/checkpoints/         checkpoint-N folders, for `--resume` (which skips one a crash left torn)
    RUN/logs/                TensorBoard events and train_log.jsonl
    RUN/trainer_state.json, RUN/train_summary.json
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import concatenate_datasets
from safetensors.torch import load_file

from dgemma_ft.errors import Interrupted, UserError
from dgemma_ft.finetune.atomic import atomic_dir, atomic_write_text
from dgemma_ft.finetune.data import BlockCollator, encode_dataset
from dgemma_ft.finetune.distributed import unsharded_for_saving
from dgemma_ft.finetune.lora import attach_lora, save_adapter
from dgemma_ft.finetune import model_loading  # called as model_loading.load_model: tests patch it there
from dgemma_ft.finetune.model_loading import free_memory, preflight, resolve_device
from dgemma_ft.finetune.objective import ObjectiveConfig
from dgemma_ft.finetune.recipe import Recipe, source_options
from dgemma_ft.finetune.run_folder import (RunState, checkpoint_step, claim, clear_unstarted, inspect,
                                           newest_complete_checkpoint)
from dgemma_ft.output_paths import require_writable_dir
from dgemma_ft.quiet import shared_keys_not_missing, shared_parameter_names
from dgemma_ft.plumbing import temperature_range
from dgemma_ft.tasks import SourceSpec, Task, get_task


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class TaskData:
    task: Task
    train: object  # datasets.Dataset
    eval: object | None
    also: dict[str, object] = field(default_factory=dict)  # eval.also name -> its dataset


def build_task_data(recipe: Recipe, train_size: int | None = None) -> TaskData:
    """The task and its train/eval datasets (and each eval.also set), with every evaluation example kept out of
    training."""
    section = recipe.task
    task = get_task(section.name, source_options(recipe, "train"))  # each source with its own options
    eval_set = None
    also = {}
    excluded: set[str] = set()
    sources = [("eval", section.eval)] + list(enumerate(recipe.eval.also))
    for where, entry in sources:
        if entry is None:
            continue
        eval_task = get_task(section.name, source_options(recipe, where))
        rows = eval_task.build_dataset("eval", entry.source_spec())
        if where == "eval":
            eval_set = rows
        else:
            also[entry.name] = rows
        if section.exclude_eval_from_train:
            excluded |= {eval_task.key(row) for row in rows}
    if section.exclude_eval_from_train:
        for source in section.exclude_sources:
            excluded |= {task.key(row) for row in task.build_dataset("eval", SourceSpec(source=source))}
    parts = []
    for where, entry in [("train", section.train), *((("train_also", i), e) for i, e in
                                                      enumerate(section.train_also))]:
        part_task = task if where == "train" else get_task(section.name, source_options(recipe, where))
        spec = entry.source_spec() if train_size is None else entry.source_spec().model_copy(
            update={"size": min(train_size, entry.size or train_size)})
        rows = part_task.build_dataset("train", spec, exclude_keys=excluded)
        overlap = excluded & {part_task.key(row) for row in rows}
        if overlap:  # build_dataset excludes them; this guards the guarantee itself
            raise UserError(f"{len(overlap)} evaluation example(s) leaked into the training data")
        parts.append(rows)
    train_set = parts[0] if len(parts) == 1 else mixed(parts)
    return TaskData(task=task, train=train_set, eval=eval_set, also=also)


def mixed(parts: list) -> object:
    """One training set of several sources' rows (the Trainer shuffles them). Sources of one task can carry
    different fields (a file's extra columns), so the mix keeps the chat `messages` training reads."""
    return concatenate_datasets([part.select_columns(["messages"]) for part in parts])


def prepare_model(recipe: Recipe):
    """(model ready to train, tokenizer, LoadedModel)."""
    loaded = model_loading.load_model(recipe.model)
    model = loaded.model
    if recipe.finetune == "lora":
        model = attach_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    else:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = not ("vision_tower" in name or "embed_vision" in name)
    return model, loaded.tokenizer, loaded


def parameter_counts(model) -> tuple[int, int, str]:
    """(trainable, total, "1.55 M parameters, 0.124 M trainable": what the run's model line says)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, f"{total / 1e6:.2f} M parameters, {trainable / 1e6:.3f} M trainable"


def plan_run(run_dir: Path, steps: int, resume: bool, say, main_process: bool = True) -> RunState:
    """What training does with `run_dir`: start fresh, start a run stopped before its first checkpoint again,
    resume from the newest complete checkpoint, or nothing for a finished run. Refuses to overwrite a run that
    has checkpoints or a finished model unless `resume`."""
    state = inspect(run_dir, steps, say if main_process else None, move_aside=main_process)
    if state.kind == "unstarted":
        say(f"{run_dir} holds a run stopped before its first checkpoint; starting it again from step 0")
        if main_process:
            clear_unstarted(run_dir)
        return RunState("fresh")
    if state.kind == "fresh":
        if resume:
            say(f"--resume: {run_dir} has no checkpoint yet; starting from step 0")
        return state
    if not resume:
        done = "a finished run" if state.kind == "finished" else f"a run with checkpoints (step {state.step})"
        raise UserError(f"train.output_dir '{run_dir}' already holds {done}; pass --resume to continue it, or "
                        f"choose another folder with --set train.output_dir=...")
    if state.kind == "finished":
        say(f"{run_dir} already finished at step {state.step} (train.steps is {steps}); nothing to resume. "
            f"Train further with --resume --set train.steps=N (N > {state.step}), or evaluate it with "
            f"`dgemma-ft eval {run_dir}`")
    elif state.step > steps:
        raise UserError(f"--resume: {state.checkpoint.name} is already past train.steps ({steps}); give "
                        f"--set train.steps=N with N > {state.step} to train further")
    elif state.step == steps:  # stopped between its last checkpoint and the final save: save, don't train
        say(f"{state.checkpoint.name} reached train.steps; saving the final weights from it")
        return RunState("save_only", state.checkpoint, state.step)
    return state


def train(recipe: Recipe, resume: bool = False, console=None) -> Path:
    """Train as the recipe says and return the run folder (at once, for a finished run resumed)."""
    preflight(recipe.model)  # backend, model.name, model folder / run recipes: before the folder is touched
    run_dir = Path(recipe.train.output_dir)
    main_process = is_main_process()
    say = console.print if console is not None and main_process else (lambda *a, **k: None)
    lock = None
    created = not run_dir.exists()
    if main_process:
        require_writable_dir(run_dir, "train.output_dir")
        lock = claim(run_dir)  # before looking inside: a second training into the folder stops here
    try:
        state = plan_run(run_dir, recipe.train.steps, resume, say, main_process)
        if state.kind == "finished":
            return run_dir
        if state.kind == "save_only":
            return save_from_checkpoint(recipe, run_dir, state.checkpoint, say) if main_process else run_dir
        return _train(recipe, run_dir, state.checkpoint, say)
    except BaseException:
        if created and main_process and not (run_dir / "recipe.yaml").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before the run began: leave no empty folder
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, run_dir: Path, checkpoint: Path | None, say) -> Path:
    # imported here: transformers' Trainer stack (accelerate, bitsandbytes) takes seconds to import, and
    # `dgemma-ft check` imports this module (build_task_data) without training
    from dgemma_ft.finetune.trainer import (BlockDiffusionTrainer, JsonlLog, RichProgress, tensorboard_log,
                                            training_arguments)

    device = training_device(recipe.model.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)

    data = build_task_data(recipe)
    say(f"[bold]task[/] {recipe.task.name}: {len(data.train)} training examples"
        + (f", {len(data.eval)} evaluation examples (kept out of training)" if data.eval is not None else "")
        + "".join(f", {len(rows)} in eval.also '{name}'" for name, rows in data.also.items()))
    model, tokenizer, loaded = prepare_model(recipe)
    trainable, total, counts = parameter_counts(model)
    say(f"[bold]model[/] {loaded.source}: {counts} ({recipe.finetune})")
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
    resume_step = checkpoint_step(checkpoint) if checkpoint else 0
    callbacks = [RichProgress(examples_per_step), JsonlLog(run_dir / "logs" / "train_log.jsonl", resume_step)]
    if is_main_process():
        callbacks.append(tensorboard_log(run_dir / "logs"))
    trainer = BlockDiffusionTrainer(
        model=model, args=args, train_dataset=encoded, data_collator=BlockCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, objective=objective, callbacks=callbacks)
    result, seconds = run_trainer(trainer, model, checkpoint, run_dir)
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


def save_from_checkpoint(recipe: Recipe, run_dir: Path, checkpoint: Path, say) -> Path:
    """Write the final adapter/model from a checkpoint at `train.steps` (the Trainer, resumed there, would train
    one step more). Loads the checkpoint's tensors through the public PEFT / `load_state_dict` paths."""
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise UserError(f"{checkpoint}: no .safetensors weights (a sharded FSDP checkpoint?); resume it with "
                        f"--set train.steps=N, N > {checkpoint_step(checkpoint)}, to finish through training")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    model, tokenizer, loaded = prepare_model(recipe)
    if recipe.finetune == "lora":
        # imported here: peft (with bitsandbytes) takes seconds to import, and `dgemma-ft check` imports this module
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
    else:
        result = model.load_state_dict(tensors, strict=False)
        unknown = [k for k in result.missing_keys if k not in shared_parameter_names(model)]
        if unknown or result.unexpected_keys:
            raise UserError(f"{checkpoint}: its weights do not match the recipe's model ({len(unknown)} missing, "
                            f"{len(result.unexpected_keys)} unexpected keys); was the recipe changed?")
    save_final(model, tokenizer, recipe, run_dir, loaded.base_name)
    shutil.copyfile(checkpoint / "trainer_state.json", run_dir / "trainer_state.json")
    summary = {"steps": recipe.train.steps, "resumed_from_step": checkpoint_step(checkpoint), "train_seconds": 0.0,
               "saved_from_checkpoint": checkpoint.name, "base": loaded.base_name}
    atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    say(f"[bold green]saved[/] the final weights of {checkpoint.name}; run folder: {run_dir}")
    del model, loaded
    free_memory()
    return run_dir


def run_trainer(trainer, model, checkpoint: Path | None, run_dir: Path):
    """`trainer.train()` (from `checkpoint` when resuming) with our progress bar in place of the Trainer's printer
    and tqdm bar; Ctrl-C (even one a finalizer swallowed: `CtrlC`) becomes one line naming the checkpoint kept.
    Returns (the Trainer's result, seconds)."""
    # imported here: the Trainer stack takes seconds to import, and `dgemma-ft check` imports this module
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dgemma_ft.finetune.trainer import CtrlC

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    ctrl_c = CtrlC()
    trainer.add_callback(ctrl_c)
    started = time.perf_counter()
    try:
        with shared_keys_not_missing(model), ctrl_c.armed():
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(trainer, run_dir)) from None
    return result, time.perf_counter() - started


def _interrupted_message(trainer, run_dir: Path) -> str:
    kept = newest_complete_checkpoint(run_dir / "checkpoints", move_aside=False)
    where = (f"{kept.name} is kept; continue with --resume" if kept is not None else
             "no checkpoint was written yet; the same command starts it again")
    return f"interrupted at step {trainer.state.global_step}: {where}"


def objective_config(train, model):
    """The objective's knobs from the recipe's `train` section (and the model's sampler temperatures)."""
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
        save_adapter(model, run_dir / "adapter", base_name)
        tokenizer.save_pretrained(str(run_dir / "adapter"))
    else:
        with atomic_dir(run_dir / "model") as staging:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
