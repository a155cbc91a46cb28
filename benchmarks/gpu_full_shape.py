"""Full 26B-A4B shape on one GPU, no download: random bf16 weights built directly on the device.

For the shape of `recipes/sudoku.yaml` (9x9 Sudoku, LoRA r 16 on attention + dense MLP, batch 1, canvas 256,
self-conditioning and AR co-loss) it prints, beside `dgemma-ft estimate`'s figure for each:
  - LoRA step peak memory and seconds per step, without and with gradient checkpointing;
  - sampler tokens/s and peak memory at batch 1, 4, 16 and `auto` (the largest batch that runs, found by halving
    on out-of-memory from 256, as `eval.batch_size: auto` does);
  - HF `generate()` tokens/s on the same prompts at batch 1.
Random weights never become confident, so every block runs all its denoising steps: tokens/s here is a floor.

    pip install --no-deps --no-build-isolation -e .   # on a GPU box without a package index
    python benchmarks/gpu_full_shape.py [--steps 16] [--layers 30] [--experts 128] [--json out.json]

`--layers/--experts/--device cpu` shrink it for a smoke run on a CPU (what CI-less checks here use).

`--experts-4bit` (needs bitsandbytes) measures `model.load_in_4bit: true` (NF4 text linears and experts, as
`recipes/sudoku-24gb.yaml` plans) instead. HF's constructor builds the whole model at once, and a 26B checkpoint
cannot be saved and reloaded through bitsandbytes' loader on the box either, so the model is built in bf16 on the
device as above (~47 GiB: this flag needs an 80 GB GPU to *build*) and then quantized in place: every text-layer
linear becomes a `bitsandbytes.nn.Linear4bit` (NF4, blocksize 64, double quantization, bf16 compute, as the
kit's loader configures it; router, self-conditioning, vision and head stay bf16), the decoder is pointed at the
encoder's quantized modules, and `quantize_experts` stores the experts in NF4. The bf16 copies are freed, the
CUDA cache emptied and the allocator's peak reset, so every figure after that is the 4-bit footprint a 24 GB card
would see (the resident bytes after quantization are printed beside the plan's weights). On a CPU the same code
runs at a reduced shape:

    python benchmarks/gpu_full_shape.py --device cpu --layers 2 --experts 16 --batches 1 --steps 1 --experts-4bit
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from real_shape import quantized_weight_bytes, released_config_cut  # benchmarks/ is on sys.path as a script
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma_ft.finetune.data import BlockCollator, as_block_batch, encode_example, prompt_ids
from dgemma_ft.finetune.estimate import estimate
from dgemma_ft.finetune.lora import attach_lora
from dgemma_ft.finetune.objective import block_diffusion_loss
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import objective_config
from dgemma_ft.finetune.tiny import build_tiny_tokenizer
from dgemma_ft.inference.evaluate import AUTO_BATCH_START, generate_batch
from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig
from dgemma_ft.memory_meter import PeakMemory
from dgemma_ft.plumbing import enable_gradient_checkpointing
from dgemma_ft.tasks import SourceSpec, get_task

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


def build(config, device: torch.device):
    torch.manual_seed(0)
    with device:  # parameters are created (and randomly initialised) on the device, in bf16
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def quantize_in_place(model, device) -> float:
    """NF4 text linears (bitsandbytes' `Linear4bit`, as `model.load_in_4bit` loads them) and NF4 experts
    (`quantize_experts`), one shared copy for encoder and decoder; the bf16 copies are freed. Returns seconds."""
    import bitsandbytes as bnb

    from dgemma_ft.finetune.lora import share_decoder_linears
    from dgemma_ft.finetune.quantize_experts import quantize_experts

    started = time.perf_counter()
    layers = model.model.encoder.language_model.layers
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if type(linear) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=64,
                                                     compress_statistics=True, quant_type="nf4",
                                                     module=quantized).to(device)
                if linear.bias is not None:
                    quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, name, quantized)
    share_decoder_linears(model, force=True)  # drops the decoder's references to the bf16 linears
    quantize_experts(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter() - started


def resident_bytes(model, device) -> int:
    """What is allocated before a measurement: everything on a CUDA device, else the model's own tensors (with
    bitsandbytes' quantization statistics)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return quantized_weight_bytes(model)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_steps(model, batch, objective, device, checkpointing: bool, steps: int = 3):
    """(seconds per step after one warm-up step, peak bytes including weights)."""
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = as_block_batch({k: v.to(device) for k, v in vars(batch).items()})
    times = []
    entry = resident_bytes(model, device)
    with PeakMemory(device if device.type == "cuda" else None) as meter:
        for step in range(steps + 1):
            synchronize(device)
            started = time.perf_counter()
            out = block_diffusion_loss(model, batch, objective)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if step:
                times.append(time.perf_counter() - started)
    del optimizer, out
    model.eval()
    return sum(times) / len(times), entry + meter.peak_bytes


def sampler_run(model, requests, steps: int, device, batch: int | str):
    """(tokens/s, peak bytes including weights, batch used)."""
    config = SamplerConfig.from_model(model, max_denoising_steps=steps, max_new_tokens=256)
    sampler = BlockDiffusionSampler(model, config)
    count = AUTO_BATCH_START.get(device.type, AUTO_BATCH_START["cpu"]) if batch == "auto" else batch
    chunk = [Request(prompt_ids=r.prompt_ids, seed=r.seed) for r in requests[:count]]
    entry = resident_bytes(model, device)
    synchronize(device)
    started = time.perf_counter()
    with PeakMemory(device if device.type == "cuda" else None) as meter:
        answers, used = generate_batch(sampler, chunk, batch == "auto")
    synchronize(device)
    seconds = time.perf_counter() - started
    return sum(len(a.token_ids) for a in answers) / seconds, entry + meter.peak_bytes, used


def hf_generate(model, requests, steps: int, device, count: int = 2) -> float:
    """tokens/s of `model.generate()` at batch 1 over `count` prompts."""
    tokens, seconds = 0, 0.0
    for request in requests[:count]:
        ids = torch.tensor([request.prompt_ids], device=device)
        synchronize(device)
        started = time.perf_counter()
        out = model.generate(ids, max_denoising_steps=steps, max_new_tokens=256)
        synchronize(device)
        seconds += time.perf_counter() - started
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        tokens += sequences.shape[-1] - (ids.shape[-1] if sequences.shape[-1] > 256 else 0)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per block for sampling")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--batches", default="1,4,16,auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--experts-4bit", action="store_true",
                        help="quantize linears and experts to NF4 in place after building (needs an 80 GB GPU to "
                             "build), then measure the 4-bit footprint")
    args = parser.parse_args()
    device = torch.device(args.device)

    config = released_config_cut(args.layers, args.experts)
    tokenizer = build_tiny_tokenizer()  # the Gemma tokenizer is not downloadable here; ids fit the vocabulary
    folder = Path("runs") / "gpu-full-shape-config"
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    overrides = [f"model.name={folder}"] + (["model.load_in_4bit=true"] if args.experts_4bit else [])
    recipe = load_recipe(ROOT / "recipes" / "sudoku.yaml", overrides)
    task = get_task(recipe.task.name, recipe.task.options)
    started = time.perf_counter()
    model = build(config, device)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device} in "
          f"{time.perf_counter() - started:.0f} s")
    figures_4bit = {}
    if args.experts_4bit:
        seconds = quantize_in_place(model, device)
        resident = resident_bytes(model, device)
        plan = estimate(recipe, prompt_tokens=1, response_tokens=1)
        planned = plan.weight_bytes + plan.buffers
        print(f"quantized linears and experts to NF4 in {seconds:.0f} s: {resident / GIB:.2f} GiB resident "
              f"(plan: weights + buffers {planned / GIB:.2f} GiB)")
        figures_4bit = {"quantize_seconds": seconds, "resident_bytes": resident, "planned_weight_bytes": planned}
    rows = task.build_dataset("train", SourceSpec(source="generate", size=recipe.train.batch_size, seed=1))
    encoded = [encode_example(tokenizer, row["messages"], config.canvas_length) for row in rows]
    batch = as_block_batch(BlockCollator(tokenizer.pad_token_id)(encoded))
    prompt_tokens = max(r["prompt_length"] for r in encoded)
    response_tokens = max(r["response_length"] for r in encoded)
    wanted = [b for b in args.batches.split(",")]
    prompts = max(AUTO_BATCH_START.get(device.type, 64) if "auto" in wanted else 0,
                  *(int(b) for b in wanted if b != "auto"), 2)
    eval_rows = task.build_dataset("eval", SourceSpec(source="generate", size=prompts, seed=2))
    requests = [Request(prompt_ids=prompt_ids(tokenizer, row["messages"]), seed=i) for i, row in enumerate(eval_rows)]
    eval_prompt = max(len(r.prompt_ids) for r in requests)

    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
               "training": [], "sampling": [], "experts_4bit": figures_4bit or None}
    model = attach_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    objective = objective_config(recipe.train, model)
    print(f"\n{'LoRA step (sudoku.yaml shape)':34} {'s/step':>7} {'peak GiB':>9} {'estimate GiB':>13}")
    for checkpointing in (False, True):
        seconds, peak = lora_steps(model, batch, objective, device, checkpointing)
        plan = estimate(recipe, checkpointing=checkpointing, prompt_tokens=prompt_tokens,
                        response_tokens=response_tokens)
        estimated = plan.training_peak["on" if checkpointing else "off"]
        label = f"checkpointing {'on' if checkpointing else 'off'}"
        print(f"{label:34} {seconds:7.2f} {peak / GIB:9.2f} {estimated / GIB:13.2f}")
        figures["training"].append({"checkpointing": checkpointing, "seconds_per_step": seconds,
                                    "peak_bytes": peak, "estimated_bytes": estimated})

    print(f"\n{'sampler (' + str(args.steps) + ' steps/block)':34} {'tok/s':>7} {'peak GiB':>9} {'estimate GiB':>13}")
    for value in args.batches.split(","):
        wanted: int | str = value if value == "auto" else int(value)
        try:
            rate, peak, used = sampler_run(model, requests, args.steps, device, wanted)
        except torch.OutOfMemoryError:
            print(f"batch {value:28} out of memory")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        plan = estimate(load_recipe(ROOT / "recipes" / "sudoku.yaml", [*overrides, f"eval.batch_size={used}"]),
                        prompt_tokens=eval_prompt, response_tokens=config.canvas_length)
        label = f"batch {value}" + (f" (ran {used})" if value == "auto" else "")
        print(f"{label:34} {rate:7.1f} {peak / GIB:9.2f} {plan.sampler_peak / GIB:13.2f}")
        figures["sampling"].append({"batch": value, "batch_used": used, "tokens_per_second": rate,
                                    "peak_bytes": peak, "estimated_bytes": plan.sampler_peak})
    rate = hf_generate(model, requests, args.steps, device)
    print(f"{'HF generate(), batch 1':34} {rate:7.1f}")
    figures["hf_generate_tokens_per_second"] = rate
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
