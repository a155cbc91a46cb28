"""The GRPO objective on the likelihood estimate: a per-position clipped ratio of the new to the old policy times
the answer's advantage, plus (optionally) `kl_coef` times the k3 estimate of KL(new || reference) per position;
averaged over an answer's scored positions, then over answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    ratio_mean: torch.Tensor  # over scored positions
    clip_fraction: torch.Tensor  # share of scored positions where the clip is active (no gradient there)
    kl: torch.Tensor | None  # mean k3 estimate over scored positions, when a reference was given


def clipped_policy_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, scored: torch.Tensor,
                        clip_eps: float, reference: torch.Tensor | None = None,
                        kl_coef: float = 0.0) -> PolicyLoss:
    """`new`, `old`, `reference`: log-probabilities (N, ...) of the same positions under the same corruption;
    `advantages` (N,); `scored` (N, ...) bool. Positions past `scored` count for nothing."""
    scored = scored.to(new.device)
    weight = scored.flatten(1).float()
    ratio = torch.exp(new - old.to(new.device)).flatten(1)
    advantage = advantages.to(new.device)[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    per_position = -surrogate
    kl = None
    if reference is not None:
        gap = (reference.to(new.device) - new).flatten(1)
        kl_terms = torch.exp(gap) - gap - 1  # k3: unbiased, always >= 0
        per_position = per_position + kl_coef * kl_terms
        kl = _mean(kl_terms.detach(), weight)
    per_answer = (per_position * weight).sum(1) / weight.sum(1).clamp(min=1)
    clipped = ((ratio < 1 - clip_eps) & (advantage < 0)) | ((ratio > 1 + clip_eps) & (advantage > 0))
    return PolicyLoss(loss=per_answer.mean(), ratio_mean=_mean(ratio.detach(), weight),
                      clip_fraction=_mean(clipped.float(), weight), kl=kl)


def _mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (values * weight).sum() / weight.sum().clamp(min=1)
