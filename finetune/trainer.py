"""A thin `transformers.Trainer` subclass: the block-diffusion loss, a NaN guard, and the objective's own figures
(diffusion loss, AR loss, mean t) in the logs. Everything else (accumulation, schedules, bf16, checkpoints and
their rotation, resume, DDP through `accelerate launch`/`torchrun`) is the stock Trainer's, set through public
`TrainingArguments` and callbacks only.

Checkpoints need no staging folder: the Trainer writes checkpoint-N in place with its `trainer_state.json` last
(after the weights, optimizer, scheduler and RNG state), and `run_folder.incomplete_reason` checks every file that
`--resume` reads, so a checkpoint a crash leaves torn is skipped and moved aside, never resumed from."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.atomic import atomic_write_text
from dgemma_ft.finetune.data import as_block_batch
from dgemma_ft.finetune.distributed import forward_through, prepare_fsdp
from dgemma_ft.finetune.objective import ObjectiveConfig, block_diffusion_loss
from dgemma_ft.finetune.run_folder import newest_complete_checkpoint, read_log

# transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing`; older 5.x has only the first.
CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before the optimizer step can spoil the weights."""


def refuse_non_finite(trainer: Trainer, loss: torch.Tensor, fix: str) -> None:
    """Stop before the optimizer step when the loss is NaN or infinite, naming the last good checkpoint."""
    if torch.isfinite(loss):
        return
    last = newest_complete_checkpoint(Path(trainer.args.output_dir), move_aside=False)
    raise NonFiniteLossError(
        f"the loss became {float(loss.detach())} at step {trainer.state.global_step + 1}; training stopped before "
        f"the update. The last good checkpoint is {last or 'none (none was written yet)'}. {fix}")


class CtrlC(TrainerCallback):
    """Ctrl-C that always stops training. Python raises KeyboardInterrupt wherever the main thread is; raised inside a
    finalizer (a `__del__`, a weakref callback) it is printed and dropped, and training would go on. While `armed`,
    SIGINT both raises (as usual) and records the press, and the next step end raises again if training is still
    running."""

    def __init__(self):
        self.pressed = False

    def _on_sigint(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def armed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pressed:
            raise KeyboardInterrupt


class AveragedFigures:
    """Mixin for a Trainer: figures noted per forward pass (`note`) reach each log line as their mean since the
    last one, beside the Trainer's loss."""

    def note(self, figures: dict[str, float]) -> None:
        if not hasattr(self, "_figures"):
            self._figures: dict[str, list[float]] = {}
        for name, value in figures.items():
            self._figures.setdefault(name, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, values in getattr(self, "_figures", {}).items():
                if values:
                    logs[name] = sum(values) / len(values)
                    values.clear()
        super().log(logs, start_time)


class BlockDiffusionTrainer(AveragedFigures, Trainer):
    def __init__(self, *args, objective: ObjectiveConfig, **kwargs):
        super().__init__(*args, **kwargs)
        prepare_fsdp(self)
        self.objective = objective

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = forward_through(model, lambda: block_diffusion_loss(model, as_block_batch(inputs), self.objective))
        refuse_non_finite(self, out.loss, "Lower train.lr, raise train.warmup_steps, or use model.dtype: float32")
        figures = {"diffusion_loss": float(out.diffusion_loss), "mean_t": float(out.mean_t)}
        if out.ar_loss is not None:
            figures["ar_loss"] = float(out.ar_loss)
        self.note(figures)
        return (out.loss, out) if return_outputs else out.loss


def tensorboard_log(log_dir: Path) -> TensorBoardCallback:
    """transformers' TensorBoard callback writing into `log_dir`. TrainingArguments 5.x has no `logging_dir` (the
    callback reads TENSORBOARD_LOGGING_DIR, a process-wide setting); its documented `tb_writer` argument names the
    folder for this run alone. Add it on the main process only: the writer creates its event file at once."""
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def training_arguments(train, run_dir: Path, use_cuda: bool, bf16: bool) -> TrainingArguments:
    """Map the recipe's `train` section onto `TrainingArguments`."""
    schedule = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[train.schedule]
    kwargs = {"min_lr": train.min_lr} if train.schedule == "cosine" else {}
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=train.steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        adam_beta1=train.betas[0],
        adam_beta2=train.betas[1],
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.log_every,
        save_strategy="steps",
        save_steps=train.checkpoint_every,
        save_total_limit=train.keep_checkpoints,  # the Trainer's rotation; it always keeps the newest checkpoint
        report_to="none",  # TensorBoard is added as tensorboard_log(RUN/logs); the stock one writes checkpoints/runs/
        disable_tqdm=True,
        remove_unused_columns=False,
        bf16=bf16,
        use_cpu=not use_cuda,
        ddp_backend=("nccl" if use_cuda else "gloo") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=train.seed,
        data_seed=train.seed,
        # non-reentrant checkpointing: gradients reach LoRA weights inside checkpointed layers even though the
        # frozen embeddings' outputs need no gradient (tests/test_memory_bounded.py checks equal gradients)
        **{CHECKPOINTING_ARG: train.gradient_checkpointing, f"{CHECKPOINTING_ARG}_kwargs": {"use_reentrant": False}},
        dataloader_num_workers=0,
    )


class RichProgress(TrainerCallback):
    """A rich progress bar with the loss and examples/s, on the main process only."""

    def __init__(self, examples_per_step: int):
        self.examples_per_step = examples_per_step
        self.progress = None
        self.task = None
        self.started = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 transient=False)
        self.progress.start()
        self.first_step = state.global_step
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           figures="")
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (state.global_step - self.first_step) * self.examples_per_step / elapsed
        figures = f"loss {logs['loss']:.4f}"
        if "ar_loss" in logs:
            figures += f" (diff {logs['diffusion_loss']:.4f}, ar {logs['ar_loss']:.4f})"
        figures += f"  {rate:.1f} ex/s  lr {logs.get('learning_rate', 0):.2e}"
        self.progress.update(self.task, figures=figures)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class JsonlLog(TrainerCallback):
    """Append every log record to logs/train_log.jsonl; on resume, drop records past the checkpoint so the log
    continues without duplicate steps."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if path.exists() and int(os.environ.get("RANK", "0")) == 0:  # one process rewrites it, not all at once
            kept = [record for record in read_log(path) if record.get("step", 0) <= resume_step]  # torn lines go
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
