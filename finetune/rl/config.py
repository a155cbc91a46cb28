"""The recipe's `rl:` section: what `dgemma-ft rl RECIPE.yaml` does. The run folder, threads, seed, checkpoint and
log cadence, and the optimizer's weight decay, betas and gradient clipping come from the recipe's `train:` section
as for `dgemma-ft RECIPE.yaml`; the number of updates, the learning rate and its warmup come from here."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from dgemma_ft.strict_models import NumbersNotBooleans


class _Section(NumbersNotBooleans):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardWeights(_Section):
    """reward = correct * [verdict correct] + score * verdict score + valid * [verdict valid]."""

    correct: float = Field(1.0, ge=0)
    score: float = Field(0.0, ge=0, description="partial credit (the verdict's score in [0, 1])")
    valid: float = Field(0.0, ge=0, description="well-formed answers (the verdict's valid)")

    @model_validator(mode="after")
    def _some_weight(self) -> RewardWeights:
        if self.correct == self.score == self.valid == 0:
            raise ValueError("every reward weight is 0, so every answer would earn the same; give correct, score "
                             "or valid a positive weight")
        return self


class RLConfig(_Section):
    steps: int = Field(200, gt=0, le=10_000_000, description="optimizer updates; at most 10,000,000")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    prompts_per_step: int = Field(16, gt=0, le=65536, description="prompts per rollout batch; at most 65,536")
    group_size: int = Field(8, ge=2, le=1024, description="answers per prompt (advantages compare answers of one "
                                                           "prompt, so at least 2); at most 1,024")
    micro_batch: int | None = Field(None, gt=0, description="answers per forward/backward pass (gradients are "
                                                            "accumulated); default: the whole rollout batch")
    inner_steps: int = Field(1, gt=0, le=64, description="policy updates per rollout batch; at most 64")
    rollout_steps: int = Field(2, gt=0, le=10_000, description="denoising steps per block for the rollouts; at "
                                                               "most 10,000")
    pin: bool = True
    renoise: bool = False
    temperature: float = Field(1.0, gt=0, le=100, description="multiplies the sampler's temperature schedule "
                                                              "(t_min, t_max) during rollouts")
    estimator: Literal["trajectory", "corruption"] = Field(
        "trajectory", description="trajectory: the exact log-probability of the sampler's recorded draws (the "
                                  "rollout's answer is its last draw); corruption: denoising log-probabilities of "
                                  "the answer from corrupted copies (the answer is the sampler's argmax)")
    answer: Literal["sampled", "argmax"] = Field(
        "sampled", description="estimator trajectory: a rollout's answer is each block's last draw (every step is "
                               "the policy's), or its argmax as in evaluation (only the draws accepted before the "
                               "last step are the policy's; with rollout_steps 1 nothing would be learned)")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    kl_coef: float = Field(0.0, ge=0)
    corruption_samples: int = Field(1, gt=0, le=64, description="estimator corruption: corrupted copies of each answer per update; at "
                                                                "most 64")
    corruption_t: tuple[float, float] = Field((0.5, 1.0), description="noise levels of the corrupted copies: "
                                                                      "uniform in [low, high]")
    keep_pinned: bool = True
    shared_noise: bool = Field(True, description="the answers to one prompt share each corruption draw (common "
                                                 "random numbers: far less noise in the gradient)")
    reward: RewardWeights = Field(default_factory=RewardWeights)
    scale_rewards: bool = True
    compare_base: bool = True

    @field_validator("corruption_t")
    @classmethod
    def _levels(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"give two noise levels 0 < low <= high <= 1, e.g. [0.5, 1.0] (got [{low}, {high}])")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        if self.estimator == "trajectory" and self.answer == "argmax" and self.rollout_steps == 1:
            raise ValueError("answer: argmax with rollout_steps: 1 leaves the policy no draw to learn from (a 1-step "
                             "answer is the argmax of one pass); use answer: sampled, or rollout_steps >= 2")
        answers = self.answers_per_step
        if self.micro_batch is not None and answers % self.micro_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must divide the answers per rollout batch "
                             f"(prompts_per_step x group_size = {answers})")
        return self

    @property
    def answers_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def micro_batches(self) -> int:
        """Forward/backward passes per update (the Trainer's gradient accumulation)."""
        return self.answers_per_step // (self.micro_batch or self.answers_per_step)
