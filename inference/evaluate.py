"""Evaluate a model on a task: sample an answer per example with the block-diffusion sampler, judge it with the
task's validator, and collect per-example records and per-setting summaries."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from dgemma_ft.chat import prompt_ids
from dgemma_ft.errors import UserError
from dgemma_ft.inference.constraints import pinned_tokens, special_token_ids, violation_checker
from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig
from dgemma_ft.plumbing import unwrap_model
from dgemma_ft.tasks import Verdict


@dataclass
class Setting:
    """One evaluation configuration."""

    steps: int
    pin: bool
    renoise: bool
    model: str = "adapter"  # which model ran: "adapter" (the run), "base", or "merged"

    @property
    def label(self) -> str:
        return f"{self.model} steps={self.steps} pin={'on' if self.pin else 'off'} " \
               f"renoise={'on' if self.renoise else 'off'}"


@dataclass
class SettingResult:
    setting: Setting
    examples: int
    correct: int
    valid: int
    mean_score: float
    seconds: float
    mean_steps: float
    mean_forwards: float
    tokens_per_forward: float
    givens_kept: float | None
    records: list[dict] = field(default_factory=list)
    batch_size: int = 0  # the batch the sampler ran (after any out-of-memory back-off)

    def summary(self) -> dict:
        return {"model": self.setting.model, "steps": self.setting.steps, "pin": self.setting.pin,
                "renoise": self.setting.renoise, "examples": self.examples, "correct": self.correct,
                "solve_rate": self.correct / max(self.examples, 1), "valid_rate": self.valid / max(self.examples, 1),
                "mean_score": self.mean_score, "seconds": round(self.seconds, 3),
                "examples_per_second": round(self.examples / max(self.seconds, 1e-9), 2),
                "mean_denoising_steps": round(self.mean_steps, 2), "mean_decoder_forwards": round(self.mean_forwards, 2),
                "tokens_per_forward": round(self.tokens_per_forward, 3),
                "tokens_per_second": round(self.tokens_per_forward * self.mean_forwards * self.examples
                                           / max(self.seconds, 1e-9), 1),
                "givens_kept_rate": self.givens_kept, "batch_size": self.batch_size}


def make_requests(task, examples: list[dict], tokenizer, seed: int) -> list[Request]:
    requests = []
    for index, example in enumerate(examples):
        requests.append(Request(prompt_ids=prompt_ids(tokenizer, example["messages"]), seed=seed * 1_000_003 + index,
                                pinned=pinned_tokens(task, example, tokenizer),
                                violations=violation_checker(task, example, tokenizer)))
    return requests


def position_limit(model) -> int | None:
    """How many positions the model reads (`max_position_embeddings` of its text config), if it says."""
    config = unwrap_model(model).config
    value = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    return int(value) if value else None


def answer_room(max_new_tokens: int, canvas: int) -> int:
    """Positions the sampler appends after the prompt: whole canvases, up to `max_new_tokens`."""
    return max(1, -(-max_new_tokens // canvas)) * canvas


def check_prompt_fits(tokens: int, room: int, limit: int | None, what: str, fix: str = "shorten it") -> None:
    """Refuse a prompt that, with the answer's room, passes the model's position limit: the sampler's masks grow
    with the square of the length, so an over-long prompt asks for gigabytes to terabytes before it fails."""
    if limit is None or tokens + room <= limit:
        return
    raise UserError(f"{what} is {tokens:,} tokens; the model reads at most {limit:,} positions "
                    f"(max_position_embeddings), {room:,} of them kept for the answer, so a prompt may have at most "
                    f"{max(limit - room, 0):,} tokens; {fix}")


def _givens_kept(task, example: dict, output: str) -> bool | None:
    """Whether every pinned character appears unchanged at its place in the answer (None if the task pins none)."""
    pinned = task.pinned(example)
    if not pinned:
        return None
    return all(offset < len(output) and output[offset] == char for offset, char in pinned.items())


AUTO_BATCH_START = {"cuda": 256, "cpu": 64}  # `batch_size: auto` starts here and halves on out-of-memory


def first_batch_size(batch_size: int | str, device: torch.device, count: int) -> int:
    if batch_size != "auto":
        return int(batch_size)
    return max(1, min(count, AUTO_BATCH_START.get(device.type, AUTO_BATCH_START["cpu"])))


def generate_batch(sampler, chunk, auto: bool, **options):
    """`sampler.generate(chunk)`; with `auto`, out-of-memory (as accelerate recognises it) halves the batch and
    retries, returning (generations, how many requests were answered). Answers do not depend on the batch: every
    example draws from its own generator."""
    while True:
        try:
            return sampler.generate(chunk, **options), len(chunk)
        except Exception as exc:
            if not auto or len(chunk) == 1 or not should_reduce_batch_size(exc):
                raise
            del exc
            clear_device_cache(garbage_collection=True)
            chunk = chunk[:len(chunk) // 2]
            if options.get("trace_index") is not None and options["trace_index"] >= len(chunk):
                options["trace_index"] = None


def evaluate_setting(model, tokenizer, task, examples: list[dict], setting: Setting, batch_size: int | str, seed: int,
                     max_new_tokens: int, progress=None, trace_index: int | None = None) -> SettingResult:
    """Run one setting over `examples`; `progress(done, correct)` is called after every judged batch.
    `batch_size: "auto"` finds the largest batch that fits (see `generate_batch`)."""
    config = SamplerConfig.from_model(model, max_denoising_steps=setting.steps, max_new_tokens=max_new_tokens)
    sampler = BlockDiffusionSampler(model, config, special_token_ids=special_token_ids(tokenizer))
    requests = make_requests(task, examples, tokenizer, seed)
    records: list[dict] = []
    generations = []
    correct = valid = 0
    score = 0.0
    kept: list[bool] = []
    seconds = 0.0
    auto = batch_size == "auto"
    size = first_batch_size(batch_size, sampler.device, len(requests))
    begin = 0
    while begin < len(requests):
        chunk = requests[begin:begin + size]
        local_trace = trace_index - begin if trace_index is not None and begin <= trace_index < begin + len(chunk) \
            else None
        started = time.perf_counter()
        batch, size = generate_batch(sampler, chunk, auto, pin=setting.pin, renoise=setting.renoise,
                                     trace_index=local_trace)
        elapsed = time.perf_counter() - started
        seconds += elapsed
        for offset, generation in enumerate(batch):
            example = examples[begin + offset]
            output = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
            verdict = _safe_validate(task, example, output)
            correct += verdict.correct
            valid += verdict.valid
            score += verdict.score
            keeps = _givens_kept(task, example, output)
            if keeps is not None:
                kept.append(keeps)
            records.append({"index": begin + offset, "prompt": example["messages"][0]["content"], "output": output,
                            "verdict": verdict.to_dict(),
                            "stats": {"denoising_steps": generation.steps, "decoder_forwards": generation.forwards,
                                      "blocks": generation.blocks, "tokens": len(generation.token_ids),
                                      "tokens_per_forward": round(generation.tokens_per_forward, 3),
                                      "renoised_positions": generation.renoised,
                                      "seconds": round(elapsed / len(batch), 5)},
                            "trace": generation.trace})
        generations.extend(batch)
        begin += len(batch)
        if progress is not None:
            progress(len(generations), correct)
    count = max(len(examples), 1)
    tokens = sum(len(g.token_ids) for g in generations)
    forwards = sum(g.forwards for g in generations)
    return SettingResult(setting=setting, examples=len(examples), correct=correct, valid=valid,
                         mean_score=score / count, seconds=seconds,
                         mean_steps=sum(g.steps for g in generations) / count, mean_forwards=forwards / count,
                         tokens_per_forward=tokens / max(forwards, 1),
                         givens_kept=(sum(kept) / len(kept)) if kept else None, records=records, batch_size=size)


def _safe_validate(task, example, output):
    try:
        return task.validate(example, output)
    except Exception as exc:  # a validator must never raise; if one does, count the answer wrong, not the run
        return Verdict(valid=False, correct=False, score=0.0, reason=f"validator error: {type(exc).__name__}")
