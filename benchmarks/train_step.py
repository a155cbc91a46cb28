"""Training speed: this kit's objective vs a re-implementation of the public reference step, side by side.

The reference step (as the TRL DiffusionGemma example describes it) draws one random block per example and runs
the whole model twice: a no-grad forward (encoder + decoder) for self-conditioning logits, then a forward with
gradients (encoder + decoder again), with the decoder's cache cut off by a 2-D mask, plus an encoder next-token
loss over every valid pair. This kit's objective runs the encoder once, the no-grad decoder pass only for the
examples drawn to self-condition, and the loss only where it is needed.

Run: python benchmarks/train_step.py [--batch 32] [--steps 8] [--threads 2]
Prints examples/s of both, and their ratio (target >= 1.0), on the same tiny model, batch and settings.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dgemma_ft.finetune.data import BlockCollator, as_block_batch, encode_example
from dgemma_ft.finetune.objective import ObjectiveConfig, block_diffusion_loss
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model


def reference_step(model, batch, eos_token_id: int, eps: float = 1e-3, sc_p: float = 0.5) -> torch.Tensor:
    """The public reference's loss: two full forwards, one random block per example, AR loss on everything."""
    input_ids = batch.input_ids
    device = input_ids.device
    batch_size, seq_len = input_ids.shape
    block = model.config.canvas_length
    vocab = model.config.text_config.vocab_size
    attention_mask = (torch.arange(seq_len, device=device)[None] <
                      (batch.prompt_lengths + batch.num_blocks * block)[:, None]).long()
    prefix_len, response_len = batch.prompt_lengths, batch.response_lengths
    num_blocks = (response_len - 1).clamp(min=0) // block + 1
    block_idx = (torch.rand(batch_size, device=device) * num_blocks).long()
    encoder_len = prefix_len + block_idx * block
    offsets = torch.arange(block, device=device)
    index = (encoder_len[:, None] + offsets).clamp(max=seq_len - 1)
    inside = offsets < (response_len - block_idx * block)[:, None]
    target = torch.where(inside, input_ids.gather(1, index), eos_token_id)
    t = eps + (1 - eps) * torch.rand(batch_size, 1, device=device)
    noisy = torch.where(torch.rand(batch_size, block, device=device) < t,
                        torch.randint(vocab, (batch_size, block), device=device), target)
    cache_mask = (torch.arange(seq_len, device=device) < encoder_len[:, None]).long()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=noisy,
                  decoder_attention_mask=torch.cat([cache_mask, torch.ones_like(noisy)], dim=1),
                  decoder_position_ids=encoder_len[:, None] + offsets)
    with torch.no_grad():
        kwargs["self_conditioning_logits"] = model(**kwargs).logits
    kwargs["self_conditioning_mask"] = torch.rand(batch_size, device=device) < sc_p
    outputs = model(**kwargs)
    diffusion = F.cross_entropy(outputs.logits.flatten(0, 1), target.flatten())
    cap = model.config.text_config.final_logit_softcapping
    encoder_logits = torch.tanh(model.lm_head(outputs.encoder_last_hidden_state).float() / cap) * cap
    pairs = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    labels = torch.where(pairs, input_ids[:, 1:], -100)
    return diffusion + F.cross_entropy(encoder_logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def make_batch(tokenizer, batch_size: int, canvas: int, seed: int = 0):
    """Sudoku-shaped examples: a short prompt and a one-canvas answer."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        digits = "".join(str(int(d)) for d in torch.randint(0, 5, (16,), generator=generator))
        grid = "\n".join(digits[i:i + 4] for i in range(0, 16, 4))
        answer = "\n".join("".join(str(int(d)) for d in torch.randint(1, 5, (4,), generator=generator))
                           for _ in range(4))
        rows.append(encode_example(tokenizer, [{"role": "user", "content": f"Solve:\n{grid}"},
                                               {"role": "assistant", "content": answer}], canvas))
    return as_block_batch(BlockCollator(tokenizer.pad_token_id)(rows))


def measure(step, model, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for index in range(steps + 2):
        if index == 2:
            started = time.perf_counter()
        loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TinySpec(canvas_length=24))
    model.train()
    batch = make_batch(tokenizer, args.batch, model.config.canvas_length)
    ours_config = ObjectiveConfig(self_conditioning_p=0.5, ar_weight=1.0)
    rows = []
    for name, step in [
        ("reference step (2 full forwards)", lambda: reference_step(model, batch, tokenizer.eos_token_id)),
        ("dgemma-ft objective, same settings", lambda: block_diffusion_loss(model, batch, ours_config).loss),
        ("dgemma-ft, ar_weight 0", lambda: block_diffusion_loss(
            model, batch, ObjectiveConfig(self_conditioning_p=0.5, ar_weight=0.0)).loss),
    ]:
        seconds = measure(step, model, args.steps)
        rows.append((name, args.batch / seconds))
    print(f"tiny DiffusionGemma ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M), batch {args.batch}, "
          f"prompt {int(batch.prompt_lengths[0])} + canvas {model.config.canvas_length} tokens, "
          f"{args.threads} threads, SC p=0.5")
    reference = rows[0][1]
    for name, rate in rows:
        print(f"  {name:<38} {rate:8.1f} examples/s   ratio vs reference {rate / reference:5.2f}x")


if __name__ == "__main__":
    main()
