"""`dgemma-ft rl RECIPE.yaml`: GRPO-style reinforcement learning of a LoRA adapter from the task's validators, for
block diffusion (uniform-noise corruption, no mask token). One job per module:

- `config`: the recipe's `rl:` section.
- `rollouts`: groups of answers per prompt from the bundled sampler, their rewards and group-normalised advantages.
- `likelihood`: the log-likelihood estimate of an answer (denoising log-probabilities from corrupted copies).
- `loss`: the clipped surrogate objective and the KL to the reference model.
- `trainer`: the `transformers.Trainer` subclass that draws rollouts and takes the updates.
- `run`: the command's driver (run folder, checkpoints, `--resume`, the evaluation after training).

This package imports nothing heavy at the top: `recipe.py` imports `config` for every command.
"""
