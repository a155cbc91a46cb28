"""Evaluation speed: the batched sampler vs a batch-size-1 `generate()` loop (how the public generate script
works), side by side on the same model and puzzles; then plain vs validator-guided renoising at equal steps.

Run: python benchmarks/eval_speed.py [--run runs/sudoku-4x4-tiny] [--puzzles 200] [--steps 16] [--threads 2]
Without a trained run folder it falls back to an untrained tiny model (speed figures only; solve rates ~0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dgemma_ft.finetune.data import prompt_ids
from dgemma_ft.finetune.model_loading import is_run_folder
from dgemma_ft.inference.evaluate import Setting, evaluate_setting
from dgemma_ft.tasks import get_task


def load(run: str):
    if is_run_folder(run):
        from dgemma_ft.inference.run_eval import resolve_target

        target = resolve_target(run)
        model, tokenizer = target.load()
        return model, tokenizer, target.recipe.task, f"run {run}"
    from dgemma_ft.finetune.recipe import load_recipe
    from dgemma_ft.finetune.tiny import build_tiny_model

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "sudoku-4x4-tiny.yaml")
    model, tokenizer = build_tiny_model(recipe.model.tiny)
    return model.eval(), tokenizer, recipe.task, "UNTRAINED tiny model (no run folder found)"


def generate_loop(model, tokenizer, task, examples, steps: int, max_new: int) -> tuple[float, int]:
    """One `model.generate()` call per puzzle, as the public generate script does; returns (seconds, solved)."""
    solved = 0
    started = time.perf_counter()
    for index, example in enumerate(examples):
        torch.manual_seed(index)
        ids = torch.tensor([prompt_ids(tokenizer, example["messages"][:1])])
        out = model.generate(ids, max_denoising_steps=steps, max_new_tokens=max_new)
        sequence = out.sequences if hasattr(out, "sequences") else out
        text = tokenizer.decode(sequence[0, ids.shape[1]:], skip_special_tokens=True)
        solved += task.validate(example, text).correct
    return time.perf_counter() - started, solved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/sudoku-4x4-tiny")
    parser.add_argument("--puzzles", type=int, default=200)
    parser.add_argument("--loop-puzzles", type=int, default=50, help="puzzles for the slow batch-size-1 loop")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, task_section, label = load(args.run)
    task = get_task(task_section.name, task_section.options)
    data = task.build_dataset("eval", {"source": "sudoku4/dream_4x4.jsonl"})
    # spread the sample over every difficulty level
    stride = max(1, len(data) // args.puzzles)
    examples = [dict(data[i]) for i in range(0, len(data), stride)][: args.puzzles]
    max_new = model.config.canvas_length
    print(f"{label}; Dream 4x4 puzzles; {args.steps} max denoising steps; {args.threads} threads")

    batched = evaluate_setting(model, tokenizer, task, examples, Setting(args.steps, pin=False, renoise=False),
                               args.batch_size, seed=0, max_new_tokens=max_new)
    loop_examples = examples[: args.loop_puzzles]
    loop_seconds, loop_solved = generate_loop(model, tokenizer, task, loop_examples, args.steps, max_new)
    batched_rate = batched.examples / batched.seconds
    loop_rate = len(loop_examples) / loop_seconds
    print("\nspeed (same model, same puzzles, pinning and renoising off):")
    print(f"  batched evaluator (batch {args.batch_size})  {batched_rate:8.1f} puzzles/s   solved "
          f"{batched.correct}/{batched.examples}")
    print(f"  generate() loop, batch size 1      {loop_rate:8.1f} puzzles/s   solved {loop_solved}/{len(loop_examples)}")
    print(f"  ratio                              {batched_rate / loop_rate:8.1f}x   (target >= 8x)")

    print("\nplain vs renoise vs pinning at equal steps:")
    print(f"  {'setting':<34} {'solved':>9} {'tokens/forward':>15} {'mean steps':>11} {'puzzles/s':>10}")
    for setting in (Setting(args.steps, False, False), Setting(args.steps, False, True),
                    Setting(args.steps, True, False), Setting(args.steps, True, True)):
        result = batched if setting == batched.setting else evaluate_setting(
            model, tokenizer, task, examples, setting, args.batch_size, seed=0, max_new_tokens=max_new)
        name = f"pin {'on' if setting.pin else 'off'}, renoise {'on' if setting.renoise else 'off'}"
        print(f"  {name:<34} {result.correct:>4}/{result.examples:<4} {result.tokens_per_forward:>15.2f} "
              f"{result.mean_steps:>11.2f} {result.examples / result.seconds:>10.1f}")


if __name__ == "__main__":
    main()
