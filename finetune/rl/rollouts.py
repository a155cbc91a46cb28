"""Rollouts: groups of answers per prompt from the bundled block-diffusion sampler (the recipe's denoising steps,
pinning and renoising, temperature), judged by the task's `validate()`, turned into rewards and group-normalised
advantages, and laid out as the rows the likelihood estimate reads (prompt + EOS-filled answer, as in training)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from dgemma_ft.finetune.data import BlockCollator, as_block_batch
from dgemma_ft.finetune.objective import BlockBatch
from dgemma_ft.finetune.rl.config import RewardWeights, RLConfig
from dgemma_ft.finetune.rl.trajectory import Trajectory, stack_records
from dgemma_ft.inference.constraints import special_token_ids
from dgemma_ft.inference.evaluate import _safe_validate, make_requests
from dgemma_ft.inference.sampling import BlockDiffusionSampler, SamplerConfig


@dataclass
class Rollouts:
    """One rollout batch: answer `p * group_size + g` is member g of prompt p's group."""

    batch: BlockBatch  # prompt + EOS-filled answer per row, right-padded (what the estimate reads)
    pinned: torch.Tensor  # (N, blocks * canvas) bool: answer positions the sampler held fixed
    rewards: torch.Tensor  # (N,) float
    advantages: torch.Tensor  # (N,) float
    correct: torch.Tensor  # (N,) bool
    valid: torch.Tensor  # (N,) bool
    texts: list[str]
    group_size: int
    trajectory: Trajectory | None = None  # with estimator trajectory: every rollout's recorded steps

    def __len__(self) -> int:
        return len(self.texts)

    def figures(self) -> dict[str, float]:
        """What the logs carry per rollout batch: mean reward, solve and valid rates, and the share of groups whose
        answers all earned the same reward (they teach nothing: every advantage is 0)."""
        groups = self.rewards.view(-1, self.group_size)
        flat = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean()
        return {"reward_mean": float(self.rewards.mean()), "solve_rate": float(self.correct.float().mean()),
                "valid_rate": float(self.valid.float().mean()), "flat_groups": float(flat)}


def reward_of(verdict, weights: RewardWeights) -> float:
    """The scalar reward of one verdict under the recipe's weights."""
    return weights.correct * float(verdict.correct) + weights.score * float(verdict.score) + \
        weights.valid * float(verdict.valid)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's standard deviation when
    `scale` (a group whose rewards are all equal gets 0 either way)."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def answer_row(prompt: list[int], answer: list[int], canvas_length: int, eos_id: int) -> dict:
    """The training layout of a sampled answer: prompt ids, then the answer EOS-filled to whole canvases (the
    sampler writes whole canvases and keeps the answer up to its first end token)."""
    blocks = max(1, math.ceil(len(answer) / canvas_length))
    filled = list(answer) + [eos_id] * (blocks * canvas_length - len(answer))
    return {"input_ids": list(prompt) + filled, "prompt_length": len(prompt), "response_length": len(answer),
            "num_blocks": blocks}


def pinned_mask(pins: list[dict[int, int]], width: int) -> torch.Tensor:
    """(N, width) bool: True at the answer positions each request's sampler held fixed."""
    mask = torch.zeros(len(pins), width, dtype=torch.bool)
    for row, pinned in enumerate(pins):
        for index in pinned:
            if index < width:
                mask[row, index] = True
    return mask


def rollout_sampler(model, tokenizer, config: RLConfig, max_new_tokens: int) -> BlockDiffusionSampler:
    """The bundled sampler at the rollout settings: `rollout_steps` per block, the temperature schedule scaled."""
    sampler_config = SamplerConfig.from_model(model, max_denoising_steps=config.rollout_steps,
                                              max_new_tokens=max_new_tokens)
    sampler_config.t_min *= config.temperature
    sampler_config.t_max *= config.temperature
    return BlockDiffusionSampler(model, sampler_config, special_token_ids=special_token_ids(tokenizer))


def draw_rollouts(model, tokenizer, task, examples: list[dict], config: RLConfig, seed: int, max_new_tokens: int,
                  batch_size: int = 64) -> Rollouts:
    """`config.group_size` answers to each example's prompt (each from its own sampler seed), with rewards and
    advantages. Answers depend only on the model, the examples and `seed`."""
    group = config.group_size
    exact = config.estimator == "trajectory"
    per_prompt = make_requests(task, examples, tokenizer, seed)  # prompt ids, pins, violations: once per prompt
    requests = [replace(request, seed=request.seed * group + member)
                for request in per_prompt for member in range(group)]
    sampler = rollout_sampler(model, tokenizer, config, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        generations = []
        for begin in range(0, len(requests), batch_size):
            generations += sampler.generate(requests[begin:begin + batch_size], pin=config.pin,
                                            renoise=config.renoise, answer=config.answer if exact else "argmax",
                                            record=exact)
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations]
    verdicts = [_safe_validate(task, examples[i // group], text) for i, text in enumerate(texts)]
    canvas = sampler.canvas
    rows = [answer_row(request.prompt_ids, generation.token_ids, canvas, tokenizer.eos_token_id)
            for request, generation in zip(requests, generations)]
    batch = as_block_batch(BlockCollator(tokenizer.pad_token_id)(rows))
    width = int(batch.num_blocks.max()) * canvas
    rewards = torch.tensor([reward_of(v, config.reward) for v in verdicts], dtype=torch.float32)
    return Rollouts(batch=batch, pinned=pinned_mask([r.pinned if config.pin else {} for r in requests], width),
                    rewards=rewards, advantages=group_advantages(rewards, group, config.scale_rewards),
                    correct=torch.tensor([bool(v.correct) for v in verdicts]),
                    valid=torch.tensor([bool(v.valid) for v in verdicts]), texts=texts, group_size=group,
                    trajectory=stack_records([g.records for g in generations], sampler.base.config.text_config.hidden_size,
                                             sampler.special_ids) if exact else None)
