"""How `dgemma-ft estimate` shows a `MemoryPlan`: a header, weights by part, the training step, the sampler and
the GPU table, as rich renderables (the plan itself is computed in `finetune/estimate.py`)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from dgemma_ft.finetune.estimate import DTYPE_LABELS, GIB, HEADROOM, MAX_EVAL_BATCH, MemoryPlan

def gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def _count(value: int) -> str:
    return f"{value / 1e9:,.3f} B" if value >= 1e8 else f"{value / 1e6:,.3f} M"


def render(plan: MemoryPlan) -> list:
    """Rich renderables: a header, weights by part, the training step, the sampler, and the GPU table."""
    tokens, step = plan.tokens, plan.step
    header = Text.from_markup(
        f"[bold]{plan.model}[/] ({plan.config_source}): {_count(plan.total_parameters)} parameters, "
        f"{_count(plan.active_parameters)} active per token; {DTYPE_LABELS[plan.dtype]}"
        f"{', 4-bit' if plan.load_in_4bit else ''}; {plan.finetune}\n"
        f"train batch {step.rows}: prompt {tokens.prompt} + {tokens.blocks} block(s) of {step.canvas} -> encoder "
        f"{step.encoder_length} tokens, decoder {step.canvases} canvas(es) = {step.decoder_queries} tokens over "
        f"{step.decoder_keys} keys; eval batch {plan.eval_batch}: prompt {tokens.eval_prompt} + "
        f"{tokens.eval_blocks} block(s)")
    weights = Table(title="Weights (GiB)", title_justify="left")
    for column, justify in (("part", "left"), ("parameters", "right"), ("dtype", "left"), ("GiB", "right")):
        weights.add_column(column, justify=justify)
    for part in plan.parts:
        weights.add_row(part.label, _count(part.parameters), DTYPE_LABELS[part.dtype], gib(part.bytes))
    weights.add_row("buffers", "", "fp32", gib(plan.buffers))
    weights.add_row("[bold]total[/]", _count(plan.total_parameters), "", f"[bold]{gib(plan.weight_bytes)}[/]")
    return [header, weights, _training_table(plan), _sampler_table(plan), _gpu_table(plan),
            Text("\n".join(f"- {note}" for note in plan.notes), style="dim")]


def _training_table(plan: MemoryPlan):
    chosen = "on" if plan.checkpointing else "off"
    table = Table(title=f"Training step (GiB), batch {plan.step.rows}; the recipe's setting: *",
                  title_justify="left")
    table.add_column("", justify="left")
    for setting, header in (("off", "no ckpt"), ("on", "ckpt")):
        table.add_column(header + ("*" if setting == chosen else ""), justify="right")
    label = "LoRA adapter" if plan.finetune == "lora" else "trainable (in the weights)"
    fixed = [("weights + buffers", plan.weight_bytes + plan.buffers),
             (f"{label}: {_count(plan.trainable_parameters)} {DTYPE_LABELS[plan.trainable_dtype]}",
              plan.adapter_bytes),
             ("gradients", plan.gradient_bytes), ("AdamW state (2 moments)", plan.optimizer_bytes)]
    if plan.dequantized_weight_bytes:
        fixed.append(("4-bit: one dequantized weight", plan.dequantized_weight_bytes))
    for name, value in fixed:
        table.add_row(name, gib(value), gib(value))
    off, on = plan.activations["off"], plan.activations["on"]
    for name in off.components:
        table.add_row(f"  {name}", gib(off.components[name]), gib(on.components[name]))
    table.add_row("activations at the peak", gib(off.peak), gib(on.peak))
    table.add_row("  in phase", off.peak_phase, on.peak_phase)
    table.add_row("[bold]peak training step[/]", *(f"[bold]{gib(plan.training_peak[s])}[/]" for s in ("off", "on")))
    return table


def _sampler_table(plan: MemoryPlan):
    table = Table(title=f"Sampler (GiB), eval batch {plan.eval_batch}", title_justify="left")
    table.add_column("", justify="left")
    table.add_column("GiB", justify="right")
    table.add_row("weights + buffers" + (" + adapter" if plan.adapter_bytes else ""),
                  gib(plan.weight_bytes + plan.buffers + plan.adapter_bytes + plan.dequantized_weight_bytes))
    for name, value in plan.sampler.components.items():
        table.add_row(f"  {name}", gib(value))
    table.add_row("  peak phase", plan.sampler.peak_phase)
    table.add_row("[bold]peak sampler[/]", f"[bold]{gib(plan.sampler_peak)}[/]")
    return table


def _gpu_table(plan: MemoryPlan):
    table = Table(title=f"Fits on one GPU (peak <= {100 - HEADROOM * 100:.0f}% of its memory)", title_justify="left")
    chosen = "ckpt" if plan.checkpointing else "no ckpt"
    for column, justify in (("GPU", "left"), ("GiB", "right"), ("train, no ckpt", "center"),
                            ("train, ckpt", "center"), (f"sampler @ {plan.eval_batch}", "center"),
                            ("max eval batch", "right")):
        table.add_column(column + ("*" if column == f"train, {chosen}" else ""), justify=justify)
    mark = {True: "[green]yes[/]", False: "[red]no[/]"}
    for gpu in plan.gpus:
        table.add_row(gpu.name, str(gpu.gib), mark[gpu.training_no_checkpointing], mark[gpu.training_checkpointing],
                      mark[gpu.sampler], _batch_cell(gpu.largest_eval_batch))
    return table


def _batch_cell(batch: int) -> str:
    if not batch:
        return "-"
    return f"{batch}+" if batch >= MAX_EVAL_BATCH else str(batch)
