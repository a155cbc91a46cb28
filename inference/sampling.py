"""Batched block-diffusion sampling for DiffusionGemma, with pinned tokens and validator-guided renoising.

The algorithm is the model's own (`DiffusionGemmaForBlockDiffusion.generate`): blocks of `canvas_length` tokens
are generated one after another; inside a block the canvas starts as uniform noise and, at each denoising step,
the decoder predicts every position, the temperature schedule (t_max -> t_min) scales the logits, the tokens with
the lowest entropies are accepted under the entropy bound, the rest are renoised, and the block stops early once
its argmax is stable and confident. Self-conditioning feeds each step's logits to the next.

What this module adds:
- Batching that does not change answers: prompts are left-padded, but every example keeps its own positions,
  padding is masked out explicitly, and every random draw comes from the example's own generator, so an answer
  does not depend on its batch neighbours (only on its seed). Finished examples leave the batch.
- Pinned tokens: positions whose token is known in advance (e.g. Sudoku givens) are fixed from the first step.
- Renoising: between steps, positions the task's validator flags on the current argmax are sent back to noise
  instead of being accepted, within a budget of steps per block.
- Statistics and an optional trace of every step for one example.
- For reinforcement learning: `answer="sampled"` makes the final step's draw the answer (a stochastic policy whose
  probability can be computed; the default keeps the model's argmax), and `record=True` keeps each step's decoder
  inputs and choices (`StepRecord`), from which `finetune/rl/trajectory.py` recomputes that probability exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma_ft.plumbing import (PrefixKV, decoder_masks, encoder_masks, logit_chunks, run_decoder, run_encoder,
                                soft_embedding_rows, unwrap_model)


@dataclass
class SamplerConfig:
    """Generation settings; defaults are the released model's generation config."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256
    renoise_budget: int = 8  # steps per block in which validator-flagged positions are renoised

    @classmethod
    def from_model(cls, model, **overrides) -> SamplerConfig:
        """Defaults from the model's generation config (what `generate()` would use), then `overrides`."""
        config = cls()
        generation = getattr(unwrap_model(model), "generation_config", None)
        for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold",
                     "max_new_tokens"):
            value = getattr(generation, name, None)
            if value is not None:
                setattr(config, name, value)
        sampler = getattr(generation, "sampler_config", None)
        bound = getattr(sampler, "entropy_bound", None) or (sampler or {}).get("entropy_bound") \
            if isinstance(sampler, dict) else getattr(sampler, "entropy_bound", None)
        if bound:
            config.entropy_bound = float(bound)
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config


@dataclass
class Request:
    """One prompt to answer. `pinned`: {answer token index: token id}; `violations(answer_ids)` returns answer
    token indices that break a constraint in the current draft (only called when renoising is on)."""

    prompt_ids: list[int]
    seed: int = 0
    pinned: dict[int, int] = field(default_factory=dict)
    violations: Callable[[list[int]], list[int]] | None = None


@dataclass
class ScoredStep:
    """What one denoising step yields per position (rows, canvas)."""

    sampled: torch.Tensor  # drawn token
    log_prob: torch.Tensor  # of the drawn token under the step's distribution
    argmax: torch.Tensor  # most likely token
    entropy: torch.Tensor  # of the step's distribution
    signal: torch.Tensor  # (rows, canvas, hidden) self-conditioning input of the next step


def _kept(values: torch.Tensor) -> torch.Tensor:
    """A CPU copy (the canvas and signal are updated in place, and `.cpu()` of a CPU tensor is the same storage)."""
    return values.to("cpu", copy=True)


@dataclass
class StepRecord:
    """One denoising step of one example, as the policy saw and chose it (CPU tensors, one canvas long): what the
    decoder read (`canvas`, self-conditioning `signal`, None on a block's first step), the temperature, which
    positions could not hold an end token, the drawn tokens, and which of them shaped the answer (`chosen`: accepted
    and not pinned; on a block's last step every position not pinned with `answer="sampled"`, none with "argmax",
    whose answer is no draw)."""

    block: int
    canvas: torch.Tensor
    signal: torch.Tensor | None
    temperature: float
    no_end: torch.Tensor
    tokens: torch.Tensor
    log_probs: torch.Tensor  # of `tokens`, as the step drew them
    chosen: torch.Tensor


@dataclass
class Generation:
    token_ids: list[int]  # the answer, up to and including the first end-of-sequence token
    steps: int = 0  # denoising steps over all blocks
    forwards: int = 0  # decoder forward passes spent on this example
    blocks: int = 0
    renoised: int = 0  # positions sent back to noise by the validator
    trace: list[dict] | None = None
    records: list[StepRecord] | None = None  # with `record=True`: every step, in order

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forwards if self.forwards else 0.0


class BlockDiffusionSampler:
    def __init__(self, model, config: SamplerConfig, eos_token_ids: list[int] | None = None,
                 special_token_ids: list[int] | None = None, chunk_elements: int | None = None):
        """`special_token_ids` (e.g. `tokenizer.all_special_ids`) are kept out of the stretch of an answer that
        leads up to its last pinned token, so decoding the answer keeps every pinned character in place.
        `chunk_elements` bounds the float32 logits alive per step (default `plumbing.LOGIT_CHUNK_ELEMENTS`)."""
        self.chunk_elements = chunk_elements
        self.model = model
        self.base = unwrap_model(model)
        self.config = config
        generation = getattr(self.base, "generation_config", None)
        eos = eos_token_ids if eos_token_ids is not None else getattr(generation, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.special_ids = sorted(set(special_token_ids or []) | self.eos_ids)
        self.canvas = self.base.config.canvas_length
        self.vocab = self.base.config.text_config.vocab_size
        self.window = self.base.config.text_config.sliding_window
        self.dtype = self.base.model.decoder.embed_tokens.weight.dtype

    # --------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    def _temperature(self, step: int) -> float:
        c = self.config
        return c.t_min + (c.t_max - c.t_min) * (step / c.max_denoising_steps)

    def _encode(self, prefix: PrefixKV, key_pos: torch.Tensor, key_ok: torch.Tensor, tokens: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Append `tokens` (B, n) at `positions` to the encoder prefix, causally, masking invalid keys."""
        masks = encoder_masks(positions, valid, torch.cat([key_pos, positions], dim=1),
                              torch.cat([key_ok, valid], dim=1), self.window, self.dtype)
        run_encoder(self.base, tokens, prefix, masks, positions.clamp(min=0))

    # ----------------------------------------------------------------------------------------------- main
    @torch.no_grad()
    def generate(self, requests: list[Request], pin: bool = True, renoise: bool = False,
                 trace_index: int | None = None, answer: str = "argmax", record: bool = False) -> list[Generation]:
        """Answer every request; returns one `Generation` each, in order. `answer`: "argmax" (the model's own
        choice: each block's last argmax) or "sampled" (each block's last draw at the step's temperature)."""
        if answer not in ("argmax", "sampled"):
            raise ValueError(f'answer must be "argmax" or "sampled" (got {answer!r})')
        device = self.device
        count = len(requests)
        results = [Generation(token_ids=[], records=[] if record else None) for _ in requests]
        if trace_index is not None:
            results[trace_index].trace = []
        generators = [torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in requests]
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        width = int(lengths.max())
        pad = width - lengths
        ids = torch.zeros(count, width, dtype=torch.long, device=device)
        for i, request in enumerate(requests):
            ids[i, int(pad[i]):] = torch.tensor(request.prompt_ids, dtype=torch.long, device=device)
        positions = torch.arange(width, device=device)[None] - pad[:, None]
        valid = positions >= 0
        prefix = PrefixKV()
        key_pos = torch.zeros(count, 0, dtype=torch.long, device=device)
        key_ok = torch.zeros(count, 0, dtype=torch.bool, device=device)
        self._encode(prefix, key_pos, key_ok, ids, positions, valid)
        key_pos, key_ok = positions, valid
        starts = lengths.clone()
        active = torch.arange(count, device=device)
        max_blocks = max(1, math.ceil(self.config.max_new_tokens / self.canvas))
        for block in range(max_blocks):
            canvas = self._denoise_block(requests, results, generators, active, prefix, key_pos, key_ok, starts,
                                         block, pin, renoise, trace_index, answer == "sampled")
            still = []
            for row, index in enumerate(active.tolist()):
                tokens = canvas[row].tolist()
                results[index].blocks += 1
                hit = [k for k, tok in enumerate(tokens) if tok in self.eos_ids]
                if hit:
                    results[index].token_ids.extend(tokens[:hit[0] + 1])
                else:
                    results[index].token_ids.extend(tokens)
                    still.append(row)
            if not still or block == max_blocks - 1:
                break
            keep = torch.tensor(still, device=device)
            prefix = prefix.select(keep)
            key_pos, key_ok, starts, canvas, active = key_pos[keep], key_ok[keep], starts[keep], canvas[keep], \
                active[keep]
            new_pos = starts[:, None] + torch.arange(self.canvas, device=device)
            new_ok = torch.ones_like(new_pos, dtype=torch.bool)
            self._encode(prefix, key_pos, key_ok, canvas, new_pos, new_ok)
            key_pos = torch.cat([key_pos, new_pos], dim=1)
            key_ok = torch.cat([key_ok, new_ok], dim=1)
            starts = starts + self.canvas
        return results

    def _denoise_block(self, requests, results, generators, active, prefix, key_pos, key_ok, starts, block,
                       pin, renoise, trace_index, sampled_answer=False) -> torch.Tensor:
        """Denoise one canvas for each active row; returns the final canvases (rows of `active`): the last argmax,
        or with `sampled_answer` the last draw."""
        c = self.config
        device = self.device
        rows = active.shape[0]
        size = self.canvas
        offset = block * size
        canvas = self._draw(generators, active.tolist(), self._noise_draw(size))
        pin_mask = torch.zeros(rows, size, dtype=torch.bool, device=device)
        pin_tokens = torch.zeros(rows, size, dtype=torch.long, device=device)
        no_end = torch.zeros(rows, size, dtype=torch.bool, device=device)  # the answer cannot end here
        if pin:
            for row, index in enumerate(active.tolist()):
                pinned = requests[index].pinned
                for token_index, token in pinned.items():
                    if offset <= token_index < offset + size:
                        pin_mask[row, token_index - offset] = True
                        pin_tokens[row, token_index - offset] = token
                if pinned:  # an answer holding its pinned tokens runs at least to the last of them
                    no_end[row, :max(0, min(size, max(pinned) + 1 - offset))] = True
            canvas = torch.where(pin_mask, pin_tokens, canvas)
        eos = torch.tensor(self.special_ids, dtype=torch.long, device=device)
        argmax = canvas.clone()
        history = torch.full((max(c.stability_threshold, 1), rows, size), -1, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        signal = None  # self-conditioning: soft embeddings (rows, canvas, hidden) of the last step's logits
        budget = torch.full((rows,), c.renoise_budget if renoise else 0, device=device)
        masks = decoder_masks(key_pos, key_ok, starts[:, None], size, self.window, self.dtype)
        positions = starts[:, None] + torch.arange(size, device=device)
        live_rows = None
        for step in reversed(range(1, c.max_denoising_steps + 1)):
            live = (~finished).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            if live_rows is None or live_rows.shape != live.shape or not torch.equal(live_rows, live):
                live_rows = live
                live_prefix = prefix if live.numel() == rows else prefix.select(live)
                live_masks = {k: v[live] for k, v in masks.items()}
            hidden = run_decoder(self.base, canvas[live], live_prefix, live_masks, positions[live],
                                 None if signal is None else signal[live])
            live_pins = pin_mask[live]
            live_ids = [int(active[r]) for r in live.tolist()]
            uniforms = self._draw(generators, live_ids, lambda g: torch.rand(size, generator=g, device="cpu"))
            scored = self._score(hidden, self._temperature(step), live_pins, pin_tokens[live], no_end[live], eos,
                                 uniforms)
            sampled, new_argmax, entropy = scored.sampled, scored.argmax, scored.entropy
            sorted_entropy, order = entropy.sort(dim=-1)
            chosen = (sorted_entropy.cumsum(-1) - sorted_entropy) <= c.entropy_bound
            accept = torch.zeros_like(chosen).scatter(-1, order, chosen) | live_pins
            flagged = torch.zeros_like(accept)
            if renoise:
                for k, row in enumerate(live.tolist()):
                    index = int(active[row])
                    check = requests[index].violations
                    if check is None or budget[row] <= 0:
                        continue
                    draft = results[index].token_ids + new_argmax[k].tolist()
                    bad = [t - offset for t in check(draft) if offset <= t < offset + size]
                    if bad:
                        flagged[k, bad] = True
                        budget[row] -= 1
                flagged &= ~live_pins
                accept &= ~flagged
            noise = self._draw(generators, live_ids, self._noise_draw(size))
            accepted = torch.where(accept, sampled, canvas[live])
            new_canvas = torch.where(accept, accepted, noise)
            stable = (history[:, live] == new_argmax[None]).all(-1).all(0) if c.stability_threshold else \
                torch.ones(live.numel(), dtype=torch.bool, device=device)
            history[:, live] = torch.roll(history[:, live], -1, dims=0)
            history[-1, live] = new_argmax
            confident = entropy.mean(-1) < c.confidence_threshold
            done = stable & confident & ~flagged.any(-1)
            last = done | (step == 1)
            if results[int(active[0])].records is not None:
                self._record(results, active, live, block, step, canvas, signal, no_end, scored, accept & ~live_pins,
                             last, ~live_pins if sampled_answer else torch.zeros_like(accept))
            canvas[live] = new_canvas
            argmax[live] = torch.where(last[:, None], sampled, new_argmax) if sampled_answer else new_argmax
            if signal is None:
                signal = scored.signal.new_zeros(rows, *scored.signal.shape[1:])
            signal[live] = scored.signal
            finished[live] |= done
            for k, row in enumerate(live.tolist()):
                result = results[int(active[row])]
                result.forwards += 1
                result.steps += 1
                result.renoised += int(flagged[k].sum())
                if result.trace is not None:
                    result.trace.append({"block": block, "step": c.max_denoising_steps - step + 1,
                                         "canvas": new_canvas[k].tolist(), "argmax": new_argmax[k].tolist(),
                                         "accepted": accept[k].tolist(), "renoised": flagged[k].tolist(),
                                         "pinned": live_pins[k].tolist()})
        return argmax

    def _record(self, results, active, live, block, step, canvas, signal, no_end, scored, kept, last, final_kept):
        """Append each live row's `StepRecord` (one device-to-CPU copy per tensor, then sliced): its inputs,
        draws, and the draws that shaped the answer (`final_kept` on a block's last step, else `kept`)."""
        chosen = torch.where(last[:, None], final_kept, kept).cpu()
        inputs = _kept(canvas[live]), None if signal is None else _kept(signal[live]), _kept(no_end[live])
        tokens, log_probs = _kept(scored.sampled), _kept(scored.log_prob)
        for k, row in enumerate(live.tolist()):
            results[int(active[row])].records.append(StepRecord(
                block=block, canvas=inputs[0][k], signal=None if inputs[1] is None else inputs[1][k],
                temperature=self._temperature(step), no_end=inputs[2][k], tokens=tokens[k], log_probs=log_probs[k],
                chosen=chosen[k]))

    def _noise_draw(self, size: int):
        """A draw of `size` uniformly random vocabulary tokens (the canvas's noise) from a CPU generator."""
        return lambda generator: torch.randint(self.vocab, (size,), generator=generator, device="cpu")

    def _draw(self, generators, indices: list[int], draw) -> torch.Tensor:
        """One draw per example from its own CPU generator (so answers do not depend on the device or the batch),
        stacked and moved to the model's device."""
        return torch.stack([draw(generators[i]) for i in indices]).to(self.device)

    def _score(self, hidden, temperature: float, pins, pin_tokens, no_end, blocked_ids, uniforms) -> ScoredStep:
        """Sample, argmax, entropy and the next self-conditioning signal for every canvas position, a bounded
        chunk of positions at a time: no (rows x canvas x vocabulary) tensor is built. Per position this is the
        model's own step: temperature-scaled soft-capped logits, pinned positions forced to their token,
        special tokens blocked where the answer cannot end, inverse-CDF sampling with the example's uniforms."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        count = flat.shape[0]
        pins, pin_tokens, no_end = pins.reshape(-1), pin_tokens.reshape(-1), no_end.reshape(-1)
        uniforms = uniforms.reshape(-1)
        sampled = torch.empty(count, dtype=torch.long, device=flat.device)
        sampled_log_prob = torch.empty(count, dtype=torch.float32, device=flat.device)
        argmax = torch.empty_like(sampled)
        entropy = torch.empty(count, dtype=torch.float32, device=flat.device)
        signal = None
        for part, logits in logit_chunks(self.base, flat, self.chunk_elements):
            logits = logits / temperature
            if blocked_ids.numel() and no_end[part].any():
                blocked = torch.zeros_like(logits, dtype=torch.bool)
                blocked[:, blocked_ids] = True
                logits = logits.masked_fill(blocked & no_end[part, None], torch.finfo(logits.dtype).min)
            if pins[part].any():
                forced = torch.full_like(logits, torch.finfo(logits.dtype).min)
                forced.scatter_(-1, pin_tokens[part, None], 0.0)
                logits = torch.where(pins[part, None], forced, logits)
            log_probs = torch.log_softmax(logits, dim=-1)
            probs = log_probs.exp()
            entropy[part] = -(probs * log_probs).sum(-1)
            cumulative = probs.cumsum(-1)
            sampled[part] = torch.searchsorted(cumulative, uniforms[part, None]).squeeze(-1).clamp(max=self.vocab - 1)
            sampled_log_prob[part] = log_probs.gather(-1, sampled[part, None]).squeeze(-1)
            argmax[part] = logits.argmax(-1)
            piece = soft_embedding_rows(self.base, logits)
            if signal is None:
                signal = piece.new_empty(count, piece.shape[-1])
            signal[part] = piece
            del logits, log_probs, probs, cumulative
        shape = hidden.shape[:-1]
        return ScoredStep(sampled=sampled.view(shape), log_prob=sampled_log_prob.view(shape), argmax=argmax.view(shape),
                          entropy=entropy.view(shape), signal=signal.view(*shape, -1))
