"""Shape-faithful check on CPU: DiffusionGemma at the released model's widths, 2 layers, a few experts.

The model is the released config (`data/models/google--diffusiongemma-26B-A4B-it/config.json`: vocabulary 262,144,
hidden 2816, 16 heads of 256, global head dim 512, keys reused as values in the full-attention layer, soft-capping)
cut to one sliding and one full layer and 16 experts (top-8, as released), with random bf16 weights. Memory depends
on shapes, not values, so this measures what the real model's step costs per layer and, above all, everything
vocabulary-sized (embeddings, logits, self-conditioning), which does not shrink with the layer count.

It runs, for the shape of `recipes/sudoku.yaml` (9x9 Sudoku, LoRA r 16, batch 1, canvas 256, self-conditioning on,
AR co-loss):
  1. one LoRA training step (forward, backward, AdamW) without and with gradient checkpointing;
  2. one evaluation of 4 9x9 puzzles at batch 4 with the sampler, and the same with the sampler as it was before the
     memory-bounded rewrite (loaded from git history, commit 6838555), when git is available;
and prints time, measured peak memory (`dgemma_ft.memory_meter.PeakMemory`), `dgemma-ft estimate`'s figure at this
shape, and their ratio. The sampler's peak beyond weights and KV prefix is also shown as a multiple of the bf16
self-conditioning buffer the old sampler kept (4 x 256 x 262144 x 2 bytes).

    python benchmarks/real_shape.py [--steps 2] [--threads 2] [--experts-4bit]

About 3-6 minutes and 12 GB of RAM on 2 CPU cores with AMX bf16 (bf16 matmuls are ~8x slower without it).

`--experts-4bit` (needs bitsandbytes) measures the same shape three ways instead: bf16; 4-bit text linears only
(bitsandbytes' loader, experts in bf16); 4-bit linears and experts (`model.load_in_4bit: true` as the kit loads
it: `load_model`, i.e. bitsandbytes' loader then `quantize_experts`). The random bf16 model is saved to a temporary
folder and loaded back from it, so the 4-bit weights come from the same path as a real checkpoint's. For each: the
LoRA step without and with checkpointing and (4-bit only) the sampler, measured against `estimate` (with
`model.load_in_4bit: true` and the matching `four_bit_parts`), then the training step's seconds and tokens/s
(encoder + decoder tokens per second) side by side, from unmetered steps interleaved across the three
configurations (`--speed-rounds`, median). About 10-15 minutes and 14 GB of RAM on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dgemma_ft.finetune.data import BlockCollator, as_block_batch, encode_example, prompt_ids
from dgemma_ft.finetune.estimate import estimate, shipped_config_dir
from dgemma_ft.finetune.lora import attach_lora
from dgemma_ft.finetune.objective import block_diffusion_loss
from dgemma_ft.finetune.recipe import load_recipe
from dgemma_ft.finetune.run import objective_config
from dgemma_ft.finetune.tiny import build_tiny_tokenizer
from dgemma_ft.inference.sampling import BlockDiffusionSampler, Request, SamplerConfig
from dgemma_ft.memory_meter import PeakMemory
from dgemma_ft.plumbing import PrefixKV, enable_gradient_checkpointing, encoder_masks, run_encoder, unwrap_model
from dgemma_ft.tasks import SourceSpec, get_task

ROOT = Path(__file__).resolve().parent.parent
RELEASED = "google/diffusiongemma-26B-A4B-it"
LEGACY_COMMIT = "6838555"  # the sampler before the memory-bounded rewrite
GIB = 2 ** 30
EVAL_BATCH = 4


def released_config_cut(layers: int | None = None, experts: int | None = None):
    """The released config (shipped in data/), optionally cut to `layers` layers (its sliding/full pattern, the last
    one full, as HF requires) and `experts` experts (top-k capped at that)."""
    data = json.loads((shipped_config_dir(RELEASED) / "config.json").read_text())
    text = data["text_config"]
    if layers is not None:
        types = text["layer_types"][:layers - 1] + ["full_attention"]
        full_layer = next(iter(text.get("per_layer_config", {}).values()), None)  # the full layers' own widths
        text["layer_types"], text["num_hidden_layers"] = types, layers
        if full_layer is not None:
            text["per_layer_config"] = {f"{i:02d}": full_layer for i, kind in enumerate(types)
                                        if kind == "full_attention"}
    if experts is not None:
        text["num_experts"] = experts
        text["top_k_experts"] = min(text["top_k_experts"], experts)
    return DiffusionGemmaConfig.from_dict(data)


def shape_faithful_config():
    """One sliding and one full layer, 16 experts (top-8 as released), every width as released."""
    return released_config_cut(layers=2, experts=16)


def build_model(config) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied and shared weights once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def weight_bytes(model) -> int:
    return storage_bytes([*model.parameters(), *model.buffers()])


def recipe_at_shape(folder: Path, tokenizer):
    """recipes/sudoku.yaml pointed at the shape-faithful config (saved with the tokenizer in `folder`)."""
    tokenizer.save_pretrained(str(folder))
    return load_recipe(ROOT / "recipes" / "sudoku.yaml", [f"model.name={folder}", "train.self_conditioning_p=1.0",
                                                           f"eval.batch_size={EVAL_BATCH}"])


def training_batch(recipe, tokenizer, canvas: int):
    task = get_task(recipe.task.name, recipe.task.options)
    rows = task.build_dataset("train", SourceSpec(source="generate", size=recipe.train.batch_size, seed=1))
    encoded = [encode_example(tokenizer, row["messages"], canvas) for row in rows]
    return as_block_batch(BlockCollator(tokenizer.pad_token_id)(encoded)), encoded


def train_step(model, batch, objective, checkpointing: bool) -> tuple[float, int, float]:
    """(seconds, peak bytes above the weights, loss) of one forward/backward/AdamW step."""
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter()
    with PeakMemory() as meter:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        out = block_diffusion_loss(model, batch, objective, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    loss = float(out.loss.detach())
    del optimizer, out
    model.eval()
    return seconds, meter.peak_bytes, loss


def eval_requests(recipe, tokenizer, count: int) -> list[Request]:
    task = get_task(recipe.task.name, recipe.task.options)
    rows = task.build_dataset("eval", SourceSpec(source="generate", size=count, seed=2))
    return [Request(prompt_ids=prompt_ids(tokenizer, row["messages"]), seed=i) for i, row in enumerate(rows)]


def prefix_bytes(model, requests) -> int:
    """Bytes of the KV prefix the sampler builds for `requests` (left-padded to the longest prompt)."""
    base = unwrap_model(model)
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    for i, request in enumerate(requests):
        ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
    positions = torch.arange(width)[None].expand(len(requests), -1)
    ok = torch.ones_like(positions, dtype=torch.bool)
    prefix = PrefixKV()
    with torch.no_grad():
        masks = encoder_masks(positions, ok, positions, ok, base.config.text_config.sliding_window,
                              torch.bfloat16)
        run_encoder(base, ids, prefix, masks, positions)
    return sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
               for layer in prefix.layers)


def run_sampler(sampler_class, config_class, request_class, model, requests, steps: int):
    config = config_class(max_denoising_steps=steps, max_new_tokens=256)
    sampler = sampler_class(model, config)
    fresh = [request_class(prompt_ids=r.prompt_ids, seed=r.seed) for r in requests]
    started = time.perf_counter()
    with PeakMemory() as meter:
        answers = sampler.generate(fresh)
    return time.perf_counter() - started, meter.peak_bytes, answers


def legacy_sampler():
    """The pre-rewrite sampler module (full-vocabulary tensors per step), from git history; None without git."""
    try:
        objective = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:finetune/objective.py"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout
        sampling = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:inference/sampling.py"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="legacy-sampler-"))
    (folder / "legacy_objective.py").write_text(objective)
    (folder / "legacy_sampling.py").write_text(sampling.replace("from dgemma_ft.finetune.objective import",
                                                                "from legacy_objective import"))
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("legacy_sampling", folder / "legacy_sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["legacy_sampling"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def quantized_weight_bytes(model) -> int:
    """Parameters and buffers plus bitsandbytes' quantization statistics (block scales, nested scales, code
    tables), which live on each 4-bit weight's `quant_state` and are neither; every storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    states = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            states.append(state)
        for parametrization in getattr(module, "parametrizations", {}).values():
            states.extend(p.quant_state for p in parametrization if getattr(p, "quant_state", None) is not None)
    while states:
        state = states.pop()
        tensors.extend(t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor))
        if getattr(state, "state2", None) is not None:
            states.append(state.state2)
    return storage_bytes(tensors)


def ratio(estimated: float, measured: float) -> str:
    return f"{estimated / measured:.2f}" if measured else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per block for the evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-legacy", action="store_true", help="skip the pre-rewrite sampler")
    parser.add_argument("--experts-4bit", action="store_true",
                        help="bf16 vs 4-bit linears vs 4-bit linears + experts: memory against estimate, speed")
    parser.add_argument("--speed-rounds", type=int, default=3, help="with --experts-4bit: timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.experts_4bit:
        main_4bit(args)
        return

    config = shape_faithful_config()
    tokenizer = build_tiny_tokenizer()
    folder = Path(tempfile.mkdtemp(prefix="real-shape-"))
    config.save_pretrained(str(folder))
    recipe = recipe_at_shape(folder, tokenizer)
    model = build_model(config)
    weights = weight_bytes(model)
    canvas = config.canvas_length
    batch, encoded = training_batch(recipe, tokenizer, canvas)
    prompt_tokens = max(row["prompt_length"] for row in encoded)
    response_tokens = max(row["response_length"] for row in encoded)
    print(f"shape-faithful DiffusionGemma: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{weights / GIB:.2f} GiB of bf16 weights; sudoku.yaml shape: batch {recipe.train.batch_size}, prompt "
          f"{prompt_tokens} + response {response_tokens} tokens, canvas {canvas}")

    model = attach_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    objective = objective_config(recipe.train, model)
    rows = []
    for checkpointing in (False, True):
        seconds, peak, loss = train_step(model, batch, objective, checkpointing)
        plan = estimate(recipe, checkpointing=checkpointing, prompt_tokens=prompt_tokens,
                        response_tokens=response_tokens)
        key = "on" if checkpointing else "off"
        estimated_beyond = plan.training_peak[key] - plan.weight_bytes - plan.buffers
        rows.append((f"LoRA step, checkpointing {key}", seconds, peak, estimated_beyond, weights))
        print(f"  loss {loss:.3f}")

    requests = eval_requests(recipe, tokenizer, EVAL_BATCH)
    prefix = prefix_bytes(model, requests)
    buffer = EVAL_BATCH * canvas * config.text_config.vocab_size * 2
    plan = estimate(recipe, prompt_tokens=max(len(r.prompt_ids) for r in requests), response_tokens=canvas)
    estimated_sampler = plan.sampler_peak - plan.weight_bytes - plan.buffers - plan.adapter_bytes
    seconds, peak, answers = run_sampler(BlockDiffusionSampler, SamplerConfig, Request, model, requests, args.steps)
    tokens = sum(len(a.token_ids) for a in answers)
    rows.append((f"sampler, batch {EVAL_BATCH}, {args.steps} steps", seconds, peak, estimated_sampler, weights))
    sampler_rows = [("after (chunked, soft-embedding signal)", peak, seconds, tokens)]
    legacy = None if args.no_legacy else legacy_sampler()
    if legacy is not None:
        seconds, legacy_peak, answers = run_sampler(legacy.BlockDiffusionSampler, legacy.SamplerConfig,
                                                    legacy.Request, model, requests, args.steps)
        sampler_rows.insert(0, (f"before (commit {LEGACY_COMMIT})", legacy_peak, seconds,
                                sum(len(a.token_ids) for a in answers)))

    print(f"\n{'measurement':42} {'seconds':>8} {'measured GiB':>13} {'estimated GiB':>14} {'ratio':>6}   "
          f"(beyond weights; with weights: measured / estimated / ratio)")
    for label, seconds, measured, estimated, base in rows:
        print(f"{label:42} {seconds:8.1f} {measured / GIB:13.3f} {estimated / GIB:14.3f} "
              f"{ratio(estimated, measured):>6}   ({(measured + base) / GIB:.2f} / {(estimated + base) / GIB:.2f} / "
              f"{ratio(estimated + base, measured + base)})")
    print(f"\nsampler peak beyond weights and KV prefix ({prefix / 2 ** 20:.1f} MiB), as a multiple of the bf16 "
          f"self-conditioning buffer {EVAL_BATCH} x {canvas} x {config.text_config.vocab_size} x 2 B = "
          f"{buffer / GIB:.2f} GiB:")
    for label, measured, seconds, count in sampler_rows:
        print(f"  {label:42} {(measured - prefix) / buffer:5.2f}x   ({measured / GIB:.2f} GiB, {seconds:.1f} s, "
              f"{count / seconds:.1f} tokens/s)")


# ------------------------------------------------------------------------------------------------- --experts-4bit
LINEARS_ONLY = frozenset({"attention", "dense_mlp"})
LINEARS_AND_EXPERTS = frozenset({"attention", "dense_mlp", "experts"})


def load_4bit(folder: Path, experts: bool):
    """The saved model in 4-bit: as `model.load_in_4bit: true` loads it (`load_model`: bitsandbytes' linears,
    then `quantize_experts`), or with bitsandbytes' loader alone (experts left in bf16)."""
    from dgemma_ft.finetune.recipe import ModelSection

    if experts:
        from dgemma_ft.finetune.model_loading import load_model

        section = ModelSection(name=str(folder), load_in_4bit=True, dtype="bfloat16", device="cpu")
        return load_model(section).model.eval()
    from transformers import BitsAndBytesConfig

    from dgemma_ft.finetune.lora import share_decoder_linears
    from dgemma_ft.finetune.model_loading import KEEP_FULL_PRECISION

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      llm_int8_skip_modules=KEEP_FULL_PRECISION)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                            attn_implementation="sdpa", device_map={"": "cpu"},
                                                            quantization_config=quantization)
    share_decoder_linears(model, force=True)  # as the kit does after bitsandbytes' loader
    return model.eval()


def set_checkpointing(model, on: bool) -> None:
    if on:
        enable_gradient_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5.2x
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def timed_step(model, batch, objective) -> float:
    """Seconds of one unmetered LoRA step (forward, backward, AdamW)."""
    model.train()
    started = time.perf_counter()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = block_diffusion_loss(model, batch, objective, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    model.eval()
    return seconds


def measure_configuration(label, model, recipe, batch, lengths, four_bit_parts, requests, steps, sampler: bool):
    """Rows (what, seconds, measured bytes beyond weights, estimated, weights measured, weights estimated) for one
    configuration, the model with its adapter, and the encoder + decoder tokens of one step."""
    weights = quantized_weight_bytes(model)
    model = attach_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets)
    objective = objective_config(recipe.train, model)
    prompt_tokens, response_tokens = lengths
    rows, step_tokens = [], 0
    for checkpointing in (False, True):
        seconds, peak, loss = train_step(model, batch, objective, checkpointing)
        plan = estimate(recipe, checkpointing=checkpointing, prompt_tokens=prompt_tokens,
                        response_tokens=response_tokens, four_bit_parts=four_bit_parts)
        key = "on" if checkpointing else "off"
        step_tokens = plan.step.rows * (plan.step.encoder_length + plan.step.decoder_queries)
        estimated = plan.training_peak[key] - plan.weight_bytes - plan.buffers
        rows.append((f"{label}: LoRA step, checkpointing {key}", seconds, peak, estimated, weights,
                     plan.weight_bytes + plan.buffers))
        print(f"  {label}, checkpointing {key}: loss {loss:.3f}, {seconds:.1f} s", flush=True)
    if sampler:
        plan = estimate(recipe, prompt_tokens=max(len(r.prompt_ids) for r in requests),
                        response_tokens=recipe_canvas(model), four_bit_parts=four_bit_parts)
        estimated = plan.sampler_peak - plan.weight_bytes - plan.buffers - plan.adapter_bytes
        seconds, peak, answers = run_sampler(BlockDiffusionSampler, SamplerConfig, Request, model, requests, steps)
        rows.append((f"{label}: sampler, batch {EVAL_BATCH}, {steps} steps", seconds, peak, estimated, weights,
                     plan.weight_bytes + plan.buffers))
        print(f"  {label}, sampler: {seconds:.1f} s, {sum(len(a.token_ids) for a in answers) / seconds:.1f} "
              f"tokens/s", flush=True)
    return rows, model, step_tokens


def recipe_canvas(model) -> int:
    return unwrap_model(model).config.canvas_length


def main_4bit(args) -> None:
    import gc

    config = shape_faithful_config()
    tokenizer = build_tiny_tokenizer()
    folder = Path(tempfile.mkdtemp(prefix="real-shape-4bit-"))
    config.save_pretrained(str(folder))
    recipe = recipe_at_shape(folder, tokenizer)
    recipe_4bit = load_recipe(ROOT / "recipes" / "sudoku.yaml", [
        f"model.name={folder}", "train.self_conditioning_p=1.0", f"eval.batch_size={EVAL_BATCH}",
        "model.load_in_4bit=true"])
    model = build_model(config)
    model.save_pretrained(str(folder))  # the 4-bit models are loaded from this copy
    canvas = config.canvas_length
    batch, encoded = training_batch(recipe, tokenizer, canvas)
    lengths = (max(row["prompt_length"] for row in encoded), max(row["response_length"] for row in encoded))
    requests = eval_requests(recipe, tokenizer, EVAL_BATCH)
    print(f"shape-faithful DiffusionGemma: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
          f"(saved to {folder}); sudoku.yaml shape: batch {recipe.train.batch_size}, prompt {lengths[0]} + "
          f"response {lengths[1]} tokens, canvas {canvas}", flush=True)

    configurations = [("bf16", None, recipe, frozenset(), False),
                      ("4-bit linears", False, recipe_4bit, LINEARS_ONLY, True),
                      ("4-bit linears + experts", True, recipe_4bit, LINEARS_AND_EXPERTS, True)]
    rows, models, step_tokens = [], [], 0
    for label, experts, plan_recipe, parts, sampler in configurations:
        started = time.perf_counter()
        if experts is not None:
            model = load_4bit(folder, experts)
            print(f"{label}: loaded in {time.perf_counter() - started:.0f} s", flush=True)
        found, model, step_tokens = measure_configuration(label, model, plan_recipe, batch, lengths, parts,
                                                          requests, args.steps, sampler)
        rows += found
        models.append((label, model, objective_config(plan_recipe.train, model)))
        gc.collect()
    shutil.rmtree(folder, ignore_errors=True)  # the saved bf16 copy (2.3 GiB) is no longer needed
    # speed: unmetered steps, the configurations interleaved round by round (the cores are shared, so contention
    # hits all three alike); the median of the rounds
    timings = {(label, key): [] for label, _, _ in models for key in ("off", "on")}
    for round_ in range(args.speed_rounds):
        for label, model, objective in models:
            for key in ("off", "on"):
                set_checkpointing(model, key == "on")
                timings[label, key].append(timed_step(model, batch, objective))
        print(f"  speed round {round_ + 1}/{args.speed_rounds} done", flush=True)

    print(f"\n{'measurement (GiB beyond weights)':60} {'seconds':>8} {'measured':>9} {'estimated':>10} "
          f"{'ratio':>6}   (with weights: measured / estimated / ratio)")
    for label, seconds, measured, estimated, weights, planned in rows:
        print(f"{label:60} {seconds:8.1f} {measured / GIB:9.3f} {estimated / GIB:10.3f} "
              f"{ratio(estimated, measured):>6}   ({(measured + weights) / GIB:.2f} / {(estimated + planned) / GIB:.2f}"
              f" / {ratio(estimated + planned, measured + weights)})")
    print("\nweights (GiB, incl. bitsandbytes' scales): "
          + "; ".join(f"{label.split(':')[0]} {weights / GIB:.3f} measured, {planned / GIB:.3f} planned"
                      for label, _, _, _, weights, planned in rows if "checkpointing off" in label))
    median = {key: statistics.median(values) for key, values in timings.items()}
    print(f"\ntraining step (LoRA, batch 1; median of {args.speed_rounds} unmetered interleaved rounds; "
          f"{step_tokens} encoder + decoder tokens per step)")
    print(f"{'configuration':26} {'ckpt off s':>10} {'tokens/s':>9} {'x bf16':>7} {'ckpt on s':>10} {'tokens/s':>9} "
          f"{'x bf16':>7}   rounds (off | on)")
    for label, _, _ in models:
        cells = []
        for key in ("off", "on"):
            seconds = median[label, key]
            cells.append(f"{seconds:10.1f} {step_tokens / seconds:9.1f} {seconds / median['bf16', key]:6.2f}x")
        rounds = " | ".join(" ".join(f"{t:.1f}" for t in timings[label, key]) for key in ("off", "on"))
        print(f"{label:26} {' '.join(cells)}   {rounds}")


if __name__ == "__main__":
    main()
