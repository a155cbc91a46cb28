"""Quickstart: the Python API end to end on the built-in tiny DiffusionGemma, on a CPU.

Each numbered block is a notebook cell. It trains the tiny model from scratch on generated 4x4 Sudoku for a few
hundred steps (the full CPU demo, `dgemma-ft recipes/sudoku-4x4-tiny.yaml`, trains 800), evaluates it on the 972
public Dream 4x4 puzzles, answers one puzzle with its verdict, and merges the run into a standard checkpoint.

    python examples/quickstart.py [--steps 300] [--out runs/quickstart] [--set key.sub=value ...]

Running it again reuses the finished run (and its report) instead of training again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dgemma_ft import Recipe, evaluate, generate, merge, train
from dgemma_ft.errors import UserError


def main(steps: int = 300, out: str = "runs/quickstart", eval_limit: int = 200, sets: list[str] = ()) -> dict:
    # 1. The shipped CPU recipe, shortened with `--set`-style overrides (a dict works too:
    #    overrides={"train.steps": 300}): fewer steps, and about one pass over as many generated puzzles.
    #    Every field is an attribute: recipe.train.lr, recipe.eval.steps, ...
    recipe = Recipe.load("sudoku-4x4-tiny.yaml", overrides=[
        f"train.steps={steps}", f"train.warmup_steps={steps // 16}", f"task.train.size={steps * 64}",
        f"train.output_dir={out}", *sets])

    # 2. Train, then evaluate on the recipe's eval set (Dream's puzzles, kept out of training).
    run = train(recipe, resume=(Path(out) / "recipe.yaml").exists())
    print(f"run folder {run.run_dir}: {run.summary['steps']} steps, train loss {run.summary.get('train_loss')}")
    for row in run.report["results"] if run.report is not None else []:  # None with eval.after_train off
        print(f"  {row['steps']} denoising steps: solved {row['correct']}/{row['examples']} ({row['solve_rate']:.1%})")

    # 3. Another evaluation: fewer denoising steps on the first puzzles. It differs from the recipe's, so it is
    #    written beside the full report (report.folder), which the model card keeps showing.
    quick = evaluate(run, steps=4, limit=eval_limit, quiet=True)
    row = quick["results"][0]
    print(f"4 denoising steps on {row['examples']} puzzles: {row['solve_rate']:.1%} solved ({quick.folder})")

    # 4. One answer, with the task's verdict and a picture of every denoising step.
    answer = generate(run, example=0, trace=f"{out}-trace.png")
    print(f"puzzle:\n{answer.prompt}\nanswer:\n{answer.text}\n"
          f"{'correct' if answer.correct else 'wrong'}: {answer.verdict['reason']} (trace: {answer.trace})")

    # 5. A standard checkpoint (transformers' from_pretrained loads it; evaluate/generate/push take it too).
    merged = merge(run, f"{out}-merged", force=True, quiet=True)
    print(f"merged checkpoint: {merged.out} ({sum(merged.files.values()) / 2**20:.1f} MiB)")
    return {"run": run, "quick": quick, "answer": answer, "merged": merged}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (the full demo trains 800)")
    parser.add_argument("--out", default="runs/quickstart", help="run folder (the merged one gets -merged)")
    parser.add_argument("--eval-limit", type=int, default=200, help="puzzles in the 4-step evaluation")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override a recipe field")
    options = parser.parse_args()
    try:
        main(options.steps, options.out, options.eval_limit, options.sets)
    except UserError as exc:  # a mistake the user can fix: its one line, as the CLI prints it
        raise SystemExit(f"error: {exc}") from None
