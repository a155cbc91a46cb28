"""The reward curve of an RL run (RUN/reward_curve.png): mean reward and solve rate of the rollouts per update,
from logs/train_log.jsonl."""

from __future__ import annotations

from pathlib import Path

from dgemma_ft.finetune.run_folder import read_log
from dgemma_ft.inference.report import new_figure, write_png


def plot_reward_curve(log_path: Path, out: Path, title: str = "Rollout reward") -> Path | None:
    """Write the curve to `out`; None when the log holds no rollout figures yet."""
    records = [r for r in read_log(log_path) if "reward_mean" in r]
    if not records:
        return None
    figure, axis = new_figure(figsize=(6.4, 4))
    steps = [r["step"] for r in records]
    axis.plot(steps, [r["reward_mean"] for r in records], label="mean reward", alpha=0.8)
    axis.plot(steps, [r["solve_rate"] for r in records], label="solve rate of the rollouts", alpha=0.8)
    if len(records) >= 10:  # a running mean over 10 log records, to see the trend through the sampling noise
        window = 10
        smooth = [sum(r["solve_rate"] for r in records[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(records))]
        axis.plot(steps, smooth, label=f"solve rate, mean of {window}", linewidth=2)
    axis.set_xlabel("update")
    axis.set_ylabel("reward / solve rate")
    rewards = [r["reward_mean"] for r in records]
    axis.set_ylim(min(0.0, min(rewards) * 1.05), max(1.02, max(rewards) * 1.05))  # weights can sum past 1
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title)
    write_png(out, figure)
    return out
