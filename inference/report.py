"""Evaluation reports a person reads: report.json (every figure with its settings), report.md (a table),
predictions.jsonl (one line per example and setting), and PNG plots (solve rate vs denoising steps, training
loss, and the trace of one generation). Every file is written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dgemma_ft.finetune.atomic import atomic_write_text
from dgemma_ft.finetune.run_folder import read_log


def write_report(out_dir: Path, header: dict, results: list, sampler: dict, training_log: Path | None,
                 tokenizer=None) -> dict:
    """Write every report file into `out_dir`; returns the report dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary() for r in results]
    report = {**header, "sampler": sampler, "results": summaries}
    plots = {}
    if summaries:
        plots["solve_rate"] = write_png(out_dir / "solve_rate_vs_steps.png", plot_solve_rate(summaries))
    if training_log is not None and training_log.exists():
        figure = plot_training_loss(training_log)
        if figure is not None:
            plots["training_loss"] = write_png(out_dir / "training_loss.png", figure)
    # trace of the richest setting: most steps, renoising and pinning on when they ran
    ranked = sorted(results, key=lambda r: (-r.setting.steps, not r.setting.renoise, not r.setting.pin))
    traced = next((r for r in ranked for rec in r.records if rec.get("trace")), None)
    if traced is not None and tokenizer is not None:
        record = next(rec for rec in traced.records if rec.get("trace"))
        plots["trace"] = write_png(out_dir / "trace.png", plot_trace(record["trace"], tokenizer,
                                                                     title=f"{traced.setting.label}: "
                                                                           f"{record['verdict']['reason']}"))
    report["plots"] = plots
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    lines = []
    for result in results:
        for record in result.records:
            row = {k: v for k, v in record.items() if k != "trace"}
            lines.append(json.dumps({"setting": result.setting.label, **row}))
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(out_dir / "report.md", markdown(report))
    return report


def markdown_table(summaries: list[dict]) -> str:
    has_givens = any(s.get("givens_kept_rate") is not None for s in summaries)
    head = "| model | steps | pin | renoise | solved | solve rate | valid | mean score | mean steps used | " \
           "tokens/forward | examples/s |" + (" givens kept |" if has_givens else "")
    rule = "|---|---:|:---:|:---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_givens else "")
    rows = [head, rule]
    for s in summaries:
        row = (f"| {s['model']} | {s['steps']} | {'on' if s['pin'] else 'off'} | {'on' if s['renoise'] else 'off'} | "
               f"{s['correct']}/{s['examples']} | {s['solve_rate']:.1%} | {s['valid_rate']:.1%} | "
               f"{s['mean_score']:.3f} | {s['mean_denoising_steps']:.1f} | {s['tokens_per_forward']:.2f} | "
               f"{s['examples_per_second']:.1f} |")
        if has_givens:
            kept = s.get("givens_kept_rate")
            row += f" {'-' if kept is None else f'{kept:.1%}'} |"
        rows.append(row)
    return "\n".join(rows)


def markdown(report: dict) -> str:
    parts = [f"# Evaluation: {report.get('target', '')}", "",
             f"Task `{report.get('task')}` on `{report.get('data')}` ({report.get('examples')} examples). "
             f"Sampler: entropy bound {report['sampler'].get('entropy_bound')}, temperature "
             f"{report['sampler'].get('t_max')} -> {report['sampler'].get('t_min')}, seed {report.get('seed')}.", "",
             *_scope_lines(report.get("evaluation")), markdown_table(report["results"]), "",
             *_also_lines(report.get("also"))]
    plots = report.get("plots", {})
    for name, title in (("solve_rate", "Solve rate vs denoising steps"), ("training_loss", "Training loss"),
                        ("trace", "One generation, step by step")):
        if name in plots:
            parts += [f"## {title}", "", f"![{title}]({plots[name]})", ""]
    return "\n".join(parts)


def _also_lines(also: list[dict] | None) -> list[str]:
    """The recipe's eval.also sets, one row per model and setting, each linking its own report."""
    if not also:
        return []
    rows = ["## Also evaluated", "", "The recipe's `eval.also` sets, with the same sampler settings; each links its "
            "own report (plots, predictions).", "", "| set | data | model | steps | solved | solve rate |",
            "|---|---|---|---:|---:|---:|"]
    for s in also:
        options = ", ".join(f"{key}={value}" for key, value in (s.get("options") or {}).items())
        data = f"`{s['data']}`" + (f" ({options})" if options else "")
        rows.append(f"| [{s['name']}]({s['report']}) | {data} | {s['model']} | {s['steps']} | "
                    f"{s['correct']}/{s['examples']} | {s['solve_rate']:.1%} |")
    return rows + [""]


def _scope_lines(evaluation: dict | None) -> list[str]:
    """Say up front when a report is not the recipe's full evaluation (a reader compares numbers across runs)."""
    if evaluation and evaluation.get("scope") == "also":
        summary = evaluation.get("summary")
        where = f" ([its report]({summary}))" if summary else ""
        options = ", ".join(f"{key}={value}" for key, value in (evaluation.get("options") or {}).items())
        options = f", task options {options} over the recipe's" if options else ""
        return [f"**Extra evaluation `{evaluation.get('name')}`** of the recipe (`eval.also`{options}), measured "
                f"with the recipe's evaluation{where} and summed up there.", ""]
    if not evaluation or evaluation.get("scope") != "partial":
        return []
    return [f"**Partial evaluation** ({', '.join(evaluation.get('differences', []))}): not the recipe's full "
            f"evaluation, which `dgemma-ft eval` without these options writes to the target's eval/ folder.", ""]


def write_png(path: Path, figure) -> str:
    """Save `figure` as the PNG at `path` (atomically); returns the file's name, as report.md links it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(buffer.getvalue())
    temp.replace(path)
    return path.name


def new_figure(figsize: tuple[float, float]):
    """(figure, axis): a figure with one axis, made without pyplot, so no backend is chosen and no figure list
    is kept (a notebook's own plotting is left as it was); savefig renders it with Agg."""
    from matplotlib.figure import Figure  # keeps every command fast: they all import this module, matplotlib ~0.7 s

    figure = Figure(figsize=figsize)
    return figure, figure.subplots()


def plot_solve_rate(summaries: list[dict]):
    figure, axis = new_figure(figsize=(6.4, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for s in summaries:
        label = f"{s['model']}, pin {'on' if s['pin'] else 'off'}, renoise {'on' if s['renoise'] else 'off'}"
        series.setdefault(label, []).append((s["steps"], s["solve_rate"]))
    for label, points in series.items():
        points.sort()
        axis.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
    axis.set_xscale("log", base=2)
    steps = sorted({s["steps"] for s in summaries})
    axis.set_xticks(steps, [str(s) for s in steps])
    axis.set_xlabel("max denoising steps per block")
    axis.set_ylabel("solved (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Solve rate vs denoising steps")
    return figure


def plot_training_loss(log_path: Path):
    records = [r for r in read_log(log_path) if "loss" in r]  # a torn last line (a killed run) is skipped
    if not records:
        return None
    figure, axis = new_figure(figsize=(6.4, 4))
    steps = [r["step"] for r in records]
    axis.plot(steps, [r["loss"] for r in records], label="total loss")
    if any("diffusion_loss" in r for r in records):
        axis.plot(steps, [r.get("diffusion_loss") for r in records], label="diffusion loss", alpha=0.8)
    if any("ar_loss" in r for r in records):
        axis.plot(steps, [r.get("ar_loss") for r in records], label="encoder AR loss", alpha=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if all(r["loss"] > 0 for r in records):  # an RL run's policy loss can be 0 or negative
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Training loss")
    return figure


def plot_trace(trace: list[dict], tokenizer, title: str = "", upto: int | None = None):
    """One row per denoising step, one column per canvas position: the token each position holds after the
    step, coloured by what happened (pinned, accepted, renoised by the validator, still noise)."""
    from matplotlib.colors import ListedColormap  # keeps every command fast (see new_figure)
    from matplotlib.patches import Patch  # keeps every command fast (see new_figure)

    width = len(trace[0]["canvas"])
    height = len(trace)
    state = np.zeros((height, width))
    shown = len(trace) if upto is None else upto
    for row, frame in enumerate(trace[:shown]):
        for col in range(width):
            if frame["pinned"][col]:
                state[row, col] = 3
            elif frame["renoised"][col]:
                state[row, col] = 2
            elif frame["accepted"][col]:
                state[row, col] = 1
    colours = ["#e6e6e6", "#8fd694", "#f08080", "#7fb2e5"]
    figure, axis = new_figure(figsize=(max(4, 0.32 * width + 1.5), max(2, 0.32 * height + 1.2)))
    axis.imshow(state, cmap=ListedColormap(colours), vmin=0, vmax=3, aspect="auto")
    for row, frame in enumerate(trace[:shown]):
        for col, token in enumerate(frame["canvas"]):
            text = tokenizer.decode([token], skip_special_tokens=False)
            text = {"\n": "⏎", " ": "␠"}.get(text, text)
            if len(text) > 3:
                text = text[:2] + "…"
            axis.text(col, row, text, ha="center", va="center", fontsize=7, family="monospace")
    labels = [f"b{f['block']} s{f['step']}" for f in trace]
    axis.set_yticks(range(height), labels, fontsize=7)
    axis.set_xticks(range(width), [str(i) for i in range(width)], fontsize=6)
    axis.set_xlabel("canvas position")
    axis.legend(handles=[Patch(color=colours[i], label=l) for i, l in
                         enumerate(["noise", "accepted", "renoised by validator", "pinned"])],
                loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=7, frameon=False)
    axis.set_title(title, fontsize=9)
    return figure


def save_trace_gif(trace: list[dict], tokenizer, path: Path) -> None:
    """An animated GIF: the canvas growing step by step (frame k shows steps 1..k)."""
    frames = []
    for end in range(1, len(trace) + 1):
        figure = plot_trace(trace, tokenizer, title=f"step {end} of {len(trace)}", upto=end)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        frames.append(Image.open(io.BytesIO(buffer.getvalue())).convert("P"))
    temp = path.with_name(f".{path.name}.tmp")
    frames[0].save(temp, format="GIF", save_all=True, append_images=frames[1:], duration=400, loop=0)
    temp.replace(path)
