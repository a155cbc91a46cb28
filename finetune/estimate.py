"""`dgemma-ft estimate`: the memory plan of a recipe, from the model's config alone (no weights are downloaded).

What it counts:

- Weights, by part, from the exact parameter shapes of `DiffusionGemmaForBlockDiffusion` built on the `meta`
  device (encoder and decoder share their text weights and the head is tied to the embeddings, so each is counted
  once), at the recipe's dtype; with `load_in_4bit`, the text layers' linear weights and the 3-D expert tensors
  in NF4 (blocksize 64, double quantization; `finetune/quantize_experts.py` for the experts), plus the largest
  weight dequantized at a time (one linear, or one expert's matrix).
- Trainable parameters (one shared LoRA adapter, or every text weight for `finetune: full`), their gradients
  and AdamW's two moment buffers.
- Activations of one training step as `finetune/objective.py` runs it: the encoder over prompt + response blocks
  (kept for backward: HF does not checkpoint encoder layers), its KV prefix, the no-grad self-conditioning
  decoder pass, the decoder over the K x C canvas tokens (checkpointed or not), one chunk of vocabulary logits
  for the cross-entropy, and the backward pass's transients.
- The sampler at the recipe's eval batch: the KV prefix of prompt + generated blocks, one no-grad decoder step,
  one chunk of logits, the self-conditioning soft embeddings.

Activation bytes are counted from first principles, per layer and per token, from what each operation of HF's
layer code keeps for backward (autograd saves an input only when some gradient needs it) or holds at once. The
few factors that such a count cannot pin down are named calibration constants below, to be fitted to
measurements (`dgemma_ft.memory_meter`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import logging as hub_logging
from transformers import AutoConfig, AutoTokenizer, DiffusionGemmaForBlockDiffusion
from transformers.utils import logging as hf_logging

from dgemma_ft.errors import UserError
from dgemma_ft.finetune.data import encode_example
from dgemma_ft.finetune.model_loading import is_run_folder
from dgemma_ft.finetune.recipe import Recipe, load_recipe, source_options
from dgemma_ft.finetune.tiny import build_tiny_tokenizer, tiny_config
from dgemma_ft.plumbing import LOGIT_CHUNK_ELEMENTS, chunk_rows
from dgemma_ft.tasks import get_task
from dgemma_ft.tasks import DATA_DIR

# ------------------------------------------------------------------------------------- calibration constants
# First fitted on CPU (dgemma_ft.memory_meter) to a 2-layer model with the released widths (one sliding and one
# full-attention layer, 16 experts, bf16 under autocast, LoRA r 16, batch 2, 164 + 64 tokens): the plan is +3%
# over the measured peak without checkpointing, +2% with it, and -1% for the sampler (batch 8, 100-token prompts).
# The tiny CPU model, far from the released proportions, is overestimated (1.1-1.25x; 1.45-1.55x with
# checkpointing).
#
# Gradients and temporaries alive at once while backward runs through a layer, in units of what the largest layer
# of that pass kept.
BACKWARD_TRANSIENT_LAYERS = 0.75
# With checkpointing, a decoder layer's recomputed forward (its kept tensors and its working set) during its
# backward, in the same units.
RECOMPUTED_LAYER_FACTOR = 1.25
# What one layer holds at once inside its forward, in units of the working set counted by `layer_workset`.
LAYER_WORKSET_FACTOR = 1.0
# Vocabulary-sized float32 tensors alive per logit chunk: the cross-entropy (logits, soft-capped logits,
# log-softmax, and their gradients when the chunk is recomputed in backward), the self-conditioning soft
# embeddings (logits, softmax, casts) and the sampler (temperature, masks, log-softmax, probabilities, cumsum).
LOGIT_COPIES_CROSS_ENTROPY = 4.0
LOGIT_COPIES_SOFT_EMBEDDINGS = 3.0
LOGIT_COPIES_SAMPLER = 6.5  # 6.5 measured on CPU (4,096-token vocabulary, 512 positions)
# KV prefixes alive at once in the sampler: `PrefixKV.select` copies the prefix when rows finish or leave.
SAMPLER_PREFIX_COPIES = 2.0

# ----------------------------------------------------------------------------------------------------- facts
HEADROOM = 0.10  # left free for the CUDA context, cuBLAS workspaces and allocator fragmentation
GIB = 2 ** 30
GPUS = (("RTX 4090, L4", 24), ("RTX 5090", 32), ("L40S, A6000", 48), ("A100, H100", 80), ("H200", 141))
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "nf4": "nf4"}
FLOAT32 = 4
INDEX = 8  # int64 indices (routing, gathers)
# NF4 as bitsandbytes stores it: two weights a byte; one absmax per 64 weights, itself quantized to 8 bits with
# one float32 absmax per 256 blocks (double quantization); per tensor an offset and the two code tables.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NF4_TENSOR_BYTES = 4 + (16 + 256) * FLOAT32
# Parts whose weights `load_in_4bit` stores in NF4: bitsandbytes' loader quantizes the text linears, and
# `quantize_experts` the 3-D expert tensors (through bitsandbytes' `replace_parameter_4bit`, same layout).
# `estimate(four_bit_parts=...)` plans another set (e.g. {"attention", "dense_mlp"}: linears only).
FOUR_BIT_PARTS = frozenset({"attention", "dense_mlp", "experts"})
PART_LABELS = {
    "embeddings": "embeddings (tied with the head)",
    "attention": "attention q/k/v/o",
    "dense_mlp": "dense MLP",
    "experts": "experts",
    "router": "router",
    "self_conditioning": "self-conditioning block",
    "norms": "norms",
    "vision": "vision tower + projection",
    "other": "other",
}
# Norms over the hidden size in one text layer (input, post-attention, pre/post feed-forward, the MoE branch's
# pre/post and the router's), each keeping a float32 copy of its input for backward.
HIDDEN_NORMS_PER_LAYER = 8
SCALED_HIDDEN_NORMS_PER_LAYER = 7  # all but the router's scale-free norm
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# The tensor each text linear reads (o_proj: a contiguous copy of the attention output, not the one sdpa keeps).
LINEAR_INPUTS = {"q_proj": "attention_in", "k_proj": "attention_in", "v_proj": "attention_in",
                 "o_proj": "attention_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_hidden"}
# Token counts without the model's tokenizer (Gemma's: every digit is one token, common words one token).
SAMPLE_EXAMPLES = 32
CHAT_TEMPLATE_TOKENS = 9  # <bos><|turn>user\n ... <turn|>\n<|turn>model\n
LETTERS_PER_TOKEN = 5
TOKEN_PIECES = re.compile(r"\d|[^\W\d_]+|\n|[ \t]+|.", re.DOTALL)
AUTO_EVAL_BATCH = 64  # the sampler row's batch when eval.batch_size is 'auto' (the GPU table gives the largest)
MAX_EVAL_BATCH = 4096  # the GPU table's "largest eval batch" stops here


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class ModelSource:
    """A model's config, where it came from, its tokenizer when one is at hand, and whether it is the tiny one."""

    config: object
    label: str
    tokenizer: object | None
    tiny: bool


def shipped_config_dir(name: str) -> Path:
    """Where the package keeps the config of Hub model `owner/name` (data/models/owner--name)."""
    return DATA_DIR / "models" / name.replace("/", "--")


def resolve_model(section) -> ModelSource:
    """The config (and tokenizer, if local) of the recipe's `model` section, without loading any weights, with
    `model.canvas_length` over the checkpoint's as `load_model` sets it."""
    source = _resolve_model(section)
    if section.canvas_length is not None:
        source.config.canvas_length = section.canvas_length
    return source


def _resolve_model(section) -> ModelSource:
    name = section.name
    if name == "tiny":
        return _tiny_source(section.tiny)
    if is_run_folder(name):
        return _run_folder_source(Path(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: folder '{name}' has no config.json; point it at a saved model folder, "
                            f"a run folder, a Hub id, or 'tiny'")
        return ModelSource(_config_from(path), str(path / "config.json"), _local_tokenizer(path), tiny=False)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _hub_source(name, section.revision)
    raise UserError(f"model.name: '{name}' is neither 'tiny', an existing folder, nor a Hub id (owner/name)")


def _tiny_source(spec) -> ModelSource:
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(spec, vocab_size=len(tokenizer), image_token_id=tokenizer.unk_token_id)
    return ModelSource(config, "built-in tiny (model.tiny)", tokenizer, tiny=True)


def _run_folder_source(path: Path) -> ModelSource:
    """A run's own weights when it saved full ones, else the base its recipe names; its saved tokenizer."""
    base = resolve_model(load_recipe(path / "recipe.yaml").model)
    saved = path / ("model" if (path / "model").is_dir() else "adapter")
    config = _config_from(saved) if (saved / "config.json").is_file() else base.config
    label = f"run folder {path} ({'its weights' if saved.name == 'model' else 'base ' + base.label})"
    return ModelSource(config, label, _local_tokenizer(saved) or base.tokenizer, tiny=base.tiny)


def _hub_source(name: str, revision: str | None) -> ModelSource:
    """The shipped config of a known Hub model, else the Hub's (from the cache first); one-line error offline."""
    shipped = shipped_config_dir(name)
    tokenizer = _cached_tokenizer(name, revision)
    if (shipped / "config.json").is_file():
        return ModelSource(_config_from(shipped), f"shipped config of {name}", tokenizer, tiny=False)
    try:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            if hub_constants.HF_HUB_OFFLINE:
                raise
            with _quiet_hub():
                config = AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError):
        raise UserError(f"model.name: cannot fetch the config of '{name}' from the Hugging Face Hub (offline, no "
                        f"access, or a wrong id); download it (`hf download {name} config.json --local-dir DIR`) "
                        f"and set model.name to that folder") from None
    return ModelSource(_checked(config, name), f"config of {name} from the Hub", tokenizer, tiny=False)


@contextlib.contextmanager
def _quiet_hub():
    """Silence huggingface_hub's per-retry warnings (the error that follows says what went wrong)."""
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)


def _config_from(folder: Path):
    """The config saved in `folder`; a broken or foreign one is a one-line error."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name: cannot read {folder / 'config.json'}: {str(exc).splitlines()[0]}") from None
    return _checked(config, str(folder))


def _checked(config, where: str):
    """`config` if it is a DiffusionGemma one: the plan reads its encoder/decoder layout."""
    if getattr(config, "model_type", None) != "diffusion_gemma":
        raise UserError(f"model.name: '{where}' is a '{getattr(config, 'model_type', '?')}' model; estimate plans "
                        f"DiffusionGemma (model_type diffusion_gemma) models only")
    return config


def _local_tokenizer(folder: Path):
    """The tokenizer saved in `folder`, or None (token counts are then approximated)."""
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        return None


def _cached_tokenizer(name: str, revision: str | None):
    """A Hub model's tokenizer if it is already in the local cache; never downloads."""
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def meta_model(config):
    """The model built on the `meta` device: every shape, no memory, no weights."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return DiffusionGemmaForBlockDiffusion(config)
    finally:
        hf_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------ parameter census
@dataclass
class PartWeights:
    part: str
    label: str
    parameters: int
    dtype: str
    bytes: int


def part_of(name: str) -> str:
    """Which part of the model a parameter name belongs to (names as `named_parameters` gives them)."""
    if "vision_tower" in name or "embed_vision" in name:
        return "vision"
    if "self_conditioning" in name:
        return "self_conditioning"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight tensor stored by bitsandbytes as NF4 with double quantization."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + math.ceil(blocks / NF4_NESTED_BLOCK) * FLOAT32 + NF4_TENSOR_BYTES


def weight_census(model, dtype: str, four_bit_parts: frozenset[str]) -> list[PartWeights]:
    """Parameters and bytes per part; shared Parameters (encoder/decoder, tied head) once."""
    counts: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        numel = parameter.numel()
        size = nf4_bytes(numel) if part in four_bit_parts else numel * DTYPE_BYTES[dtype]
        entry = counts.setdefault(part, [0, 0])
        entry[0] += numel
        entry[1] += size
    return [PartWeights(part, PART_LABELS[part], counts[part][0], "nf4" if part in four_bit_parts else dtype,
                        counts[part][1]) for part in PART_LABELS if part in counts]


def buffer_bytes(model) -> int:
    """Rotary tables and scalars: small, but resident."""
    return sum(buffer.numel() * FLOAT32 for buffer in model.buffers())


# ---------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class LayerDims:
    """One text layer's widths (as its modules have them: full-attention layers differ from sliding ones)."""

    sliding: bool
    heads: int
    head_dim: int
    kv_heads: int
    linears: dict[str, tuple[int, int]]  # target name -> (in_features, out_features)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    vocab: int
    canvas: int
    intermediate: int
    moe_intermediate: int
    top_k: int
    experts: int
    layers: tuple[LayerDims, ...]


def model_dims(model) -> ModelDims:
    """The widths activations depend on, read from the built modules (not re-derived from the config)."""
    text = model.config.text_config
    layers = []
    for layer in model.model.encoder.language_model.layers:
        attention = layer.self_attn
        linears = {name: (module.in_features, module.out_features)
                   for owner in (attention, layer.mlp) for name in (*ATTENTION_LINEARS, *MLP_LINEARS)
                   if isinstance(module := getattr(owner, name, None), torch.nn.Linear)}
        kv_heads = attention.k_proj.out_features // attention.head_dim
        layers.append(LayerDims(sliding=attention.is_sliding, heads=text.num_attention_heads,
                                head_dim=attention.head_dim, kv_heads=kv_heads, linears=linears))
    experts = model.model.encoder.language_model.layers[0].experts
    return ModelDims(hidden=text.hidden_size, vocab=text.vocab_size, canvas=model.config.canvas_length,
                     intermediate=text.intermediate_size, moe_intermediate=experts.intermediate_dim,
                     top_k=text.top_k_experts, experts=experts.num_experts, layers=tuple(layers))


def lora_parameters(dims: ModelDims, rank: int, targets: list[str]) -> int:
    """Parameters of one shared adapter: r x (in + out) per targeted linear of each text layer, counted once
    (the decoder runs through the encoder's adapter)."""
    return sum(rank * (shape[0] + shape[1]) for layer in dims.layers for name, shape in layer.linears.items()
               if name in targets)


# ------------------------------------------------------------------------------------------------ tokens
@dataclass
class TokenPlan:
    """Longest prompt and response (tokens) in a sample of the task's examples; batches pad to the longest."""

    prompt: int
    response: int
    blocks: int
    eval_prompt: int
    eval_blocks: int
    source: str


def approximate_tokens(text: str) -> int:
    """Gemma-style token count without the tokenizer: digits and punctuation one token each, a word one token
    per `LETTERS_PER_TOKEN` letters, a single space joined to the next word."""
    count = 0
    for piece in TOKEN_PIECES.findall(text):
        if piece[0].isalpha():
            count += math.ceil(len(piece) / LETTERS_PER_TOKEN)
        elif piece != " ":
            count += 1
    return count


def _example_tokens(messages, tokenizer, canvas: int) -> tuple[int, int]:
    """(prompt tokens, response tokens incl. end-of-turn) of one chat example."""
    if tokenizer is not None:
        encoded = encode_example(tokenizer, messages, canvas)
        return encoded["prompt_length"], encoded["response_length"]
    prompt = CHAT_TEMPLATE_TOKENS + sum(approximate_tokens(m["content"]) for m in messages[:-1])
    return prompt, approximate_tokens(messages[-1]["content"]) + 1


def _sample_sources(recipe: Recipe, split: str):
    """Sources to draw a sample from, local ones (generated or files) before Hub datasets."""
    section = recipe.task
    ordered = [("train", section.train), ("eval", section.eval)]
    if split == "eval":
        ordered.reverse()
    present = [(name, spec) for name, spec in ordered if spec is not None]
    return sorted(present, key=lambda item: item[1].source.startswith("hf:"))


def _sample_lengths(recipe: Recipe, split: str, tokenizer, canvas: int) -> tuple[int, int] | None:
    """(longest prompt, longest response) over a few examples of the task, or None when no source is readable."""
    for name, spec in _sample_sources(recipe, split):
        try:
            task = get_task(recipe.task.name, source_options(recipe, name))
            data = task.build_dataset(name, spec.source_spec().model_copy(update={"size": SAMPLE_EXAMPLES}))
        except UserError:
            continue
        lengths = [_example_tokens(row["messages"], tokenizer, canvas) for row in data]
        return max(p for p, _ in lengths), max(r for _, r in lengths)
    return None


def token_plan(recipe: Recipe, source: ModelSource, canvas: int, prompt_tokens: int | None = None,
               response_tokens: int | None = None) -> TokenPlan:
    """Prompt and response lengths for the plan: given, else counted on a sample of the task's examples."""
    how = "given" if prompt_tokens and response_tokens else (
        "tokenizer" if source.tokenizer is not None else "approximate (no tokenizer at hand: digits 1 token, "
                                                         f"words {LETTERS_PER_TOKEN} letters/token)")
    train = eval_ = None
    if not (prompt_tokens and response_tokens):
        train = _sample_lengths(recipe, "train", source.tokenizer, canvas)
        eval_ = _sample_lengths(recipe, "eval", source.tokenizer, canvas) if train else None
        if train is None:
            raise UserError(f"task.{recipe.task.name}: no data source can be read here to measure prompt and "
                            f"response lengths; pass --prompt-tokens N and --response-tokens N")
    prompt = prompt_tokens or train[0]
    response = response_tokens or train[1]
    eval_prompt = prompt_tokens or eval_[0]
    eval_response = response_tokens or eval_[1]
    blocks = max(1, math.ceil(response / canvas))
    if recipe.train.max_blocks:
        blocks = min(blocks, recipe.train.max_blocks)
    max_new = recipe.eval.max_new_tokens or eval_response
    return TokenPlan(prompt=prompt, response=response, blocks=blocks, eval_prompt=eval_prompt,
                     eval_blocks=max(1, math.ceil(max_new / canvas)), source=how)


# --------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Regime:
    """How a pass runs: activation bytes, what carries gradients, and whether attention scores are built."""

    act_bytes: int
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_copies: bool = False  # float32 adapters under a 16-bit compute dtype copy each input they read
    full: bool = False
    scores: bool = False  # eager attention (or sdpa's math kernel) materialises (heads x queries x keys) scores


def layer_saved_per_token(layer: LayerDims, dims: ModelDims, regime: Regime) -> dict[str, float]:
    """Bytes per token that one text layer keeps for backward, by what keeps them."""
    s, h = regime.act_bytes, dims.hidden
    k_top, inter, moe = dims.top_k, dims.intermediate, dims.moe_intermediate
    norms = HIDDEN_NORMS_PER_LAYER * h * FLOAT32 + (layer.q_width + 2 * layer.kv_width) * FLOAT32
    if regime.full:  # a norm with a trainable scale also keeps its normalised float32 output
        norms += (SCALED_HIDDEN_NORMS_PER_LAYER * h + layer.q_width + layer.kv_width) * FLOAT32
    saved = {
        "norms": norms,
        "attention": 2 * layer.q_width * s,  # rotated queries and the attention output (sdpa keeps both)
        "dense_mlp": 3 * inter * s,  # gate, its activation, up
        "experts": k_top * (3 * moe + h) * s,  # per routed copy: gate_up, activation, expert output
        "routing": dims.experts * FLOAT32 + k_top * (3 * INDEX + 3 * FLOAT32),
    }
    if regime.full:  # trainable experts and router also keep their inputs
        saved["experts"] += k_top * (h + moe) * s
        saved["routing"] += h * s
    saved["linear_inputs"] = _linear_inputs_per_token(layer, regime)
    return saved


def _linear_inputs_per_token(layer: LayerDims, regime: Regime) -> float:
    """Inputs the text linears keep for their weight (or adapter) gradients, beyond what `saved` counts."""
    s = regime.act_bytes
    targets = [t for t in (LINEAR_INPUTS if regime.full else regime.lora_targets) if t in layer.linears]
    adapter_outputs = 0 if regime.full else len(targets) * regime.lora_rank * s
    if regime.lora_copies:  # each adapter casts its input to float32, autocast casts it back: one copy each
        return sum(layer.linears[t][0] for t in targets) * s + adapter_outputs
    widths = {LINEAR_INPUTS[t]: layer.linears[t][0] for t in targets}  # linears reading one tensor keep it once
    return sum(widths.values()) * s + adapter_outputs


def layer_saved(layer: LayerDims, dims: ModelDims, regime: Regime, rows: int, queries: int, keys: int,
                encoder: bool) -> float:
    """Bytes one layer keeps for backward over `rows` x `queries` tokens attending to `keys` keys per row."""
    per_token = sum(layer_saved_per_token(layer, dims, regime).values())
    repeats = layer.heads != layer.kv_heads
    kv_width = layer.q_width if repeats else (0 if encoder else layer.kv_width)  # encoder: its KV prefix itself
    total = rows * queries * per_token + rows * keys * 2 * kv_width * regime.act_bytes
    if regime.scores:
        total += rows * layer.heads * queries * keys * (FLOAT32 + regime.act_bytes)
    return total


def layer_workset(layer: LayerDims, dims: ModelDims, regime: Regime, rows: int, queries: int, keys: int) -> float:
    """Bytes one layer holds at once inside its forward (its largest stage), whatever it keeps afterwards."""
    s, h = regime.act_bytes, dims.hidden
    tokens = rows * queries
    attention = tokens * (2 * layer.q_width + 2 * layer.kv_width) * s + rows * keys * 2 * layer.q_width * s
    if regime.scores:
        attention += rows * layer.heads * queries * keys * (FLOAT32 + 2 * s)
    mlp = tokens * 4 * dims.intermediate * s
    # routed copies: inputs, gate_up (then activation and product), outputs, and the outputs times the float32
    # routing weights (float32 by type promotion) with their reordered copy
    moe = tokens * (dims.top_k * max(h * (2 * s + 2 * FLOAT32), (h + 4 * dims.moe_intermediate) * s)
                    + 2 * dims.experts * FLOAT32)
    residual = tokens * (3 * h * s + h * FLOAT32)
    return LAYER_WORKSET_FACTOR * (max(attention, mlp, moe) + residual)


def kv_prefix_bytes(dims: ModelDims, rows: int, length: int, act_bytes: int) -> float:
    """The encoder's KV prefix: keys and values of every layer at full length. Full-attention layers have no
    v_proj, but their values are `v_norm` of the raw keys, a tensor of its own, so they store both too."""
    return sum(rows * length * 2 * layer.kv_width * act_bytes for layer in dims.layers)


def logit_chunk_bytes(dims: ModelDims, rows: int, copies: float) -> float:
    """Float32 vocabulary logits of one chunk (at most `LOGIT_CHUNK_ELEMENTS`), times the copies alive."""
    return min(rows, chunk_rows(dims.vocab, LOGIT_CHUNK_ELEMENTS)) * dims.vocab * FLOAT32 * copies


def small_tensors(dims: ModelDims, rows: int, queries: int, keys: int, act_bytes: int) -> float:
    """Masks (one per layer type) and rotary tables (cos, sin per layer type) of one pass."""
    head_dims = {layer.head_dim for layer in dims.layers}
    return 2 * rows * queries * keys * act_bytes + rows * queries * 2 * sum(head_dims) * act_bytes


@dataclass
class StepShape:
    """Tokens of one training step: B rows, encoder length L, K canvases of C tokens per row."""

    rows: int
    encoder_length: int
    canvases: int
    canvas: int
    response: int

    @property
    def decoder_queries(self) -> int:
        return self.canvases * self.canvas

    @property
    def decoder_keys(self) -> int:
        return self.encoder_length + self.decoder_queries


def step_shape(recipe: Recipe, tokens: TokenPlan, canvas: int, batch: int) -> StepShape:
    """What `block_diffusion_loss` builds: the encoder reads prompt + every block (without the AR loss only up
    to the last chosen block, at worst the last one), the decoder K = chosen blocks x canvas_samples canvases."""
    train = recipe.train
    chosen = tokens.blocks if train.block_selection == "all" else 1
    encoded_blocks = tokens.blocks if train.ar_weight > 0 else tokens.blocks - 1
    return StepShape(rows=batch, encoder_length=tokens.prompt + encoded_blocks * canvas,
                     canvases=chosen * train.canvas_samples, canvas=canvas, response=tokens.response)


@dataclass
class Activations:
    """Activation bytes by component, and the bytes alive in each phase of the step (the peak is the largest)."""

    components: dict[str, float]
    phases: dict[str, float]

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def _pass_saved(dims: ModelDims, regime: Regime, rows: int, queries: int, keys: int, encoder: bool):
    """(all layers, largest layer) bytes kept for backward by one pass."""
    per_layer = [layer_saved(layer, dims, regime, rows, queries, keys, encoder) for layer in dims.layers]
    return sum(per_layer), max(per_layer)


def _workset(dims: ModelDims, regime: Regime, rows: int, queries: int, keys: int) -> float:
    return max(layer_workset(layer, dims, regime, rows, queries, keys) for layer in dims.layers)


def training_activations(dims: ModelDims, regime: Regime, shape: StepShape, checkpointing: bool,
                         self_conditioning: bool) -> Activations:
    """Activations of one training step. Phases, in order: the encoder's forward; the no-grad
    self-conditioning pass (worst case: every row drawn), which copies the prefix for its rows; the decoder's
    forward; the cross-entropy chunks; the backward, while gradients of the KV prefix accumulate. Only decoder
    layers are checkpointed (HF's encoder layers write the KV prefix and are not checkpointable)."""
    s, rows, hidden = regime.act_bytes, shape.rows, dims.hidden
    length, queries, keys = shape.encoder_length, shape.decoder_queries, shape.decoder_keys
    no_grad = Regime(act_bytes=s, scores=regime.scores)
    encoder, encoder_layer = _pass_saved(dims, regime, rows, length, length, encoder=True)
    encoder += rows * length * hidden * (FLOAT32 + s)  # final norm and the hidden states the AR loss reads
    prefix = kv_prefix_bytes(dims, rows, length, s)
    decoder, decoder_layer = _pass_saved(dims, regime, rows, queries, keys, encoder=False)
    if checkpointing:  # each decoder layer keeps only its input; backward recomputes one layer at a time
        decoder = len(dims.layers) * rows * queries * hidden * s
    decoder += rows * queries * hidden * (FLOAT32 + 2 * s)  # final norm, hidden states, cross-entropy rows
    signal = rows * queries * hidden * s if self_conditioning else 0.0
    soft_embeddings = logit_chunk_bytes(dims, rows * queries, LOGIT_COPIES_SOFT_EMBEDDINGS)
    sc_pass = prefix + signal + max(_workset(dims, no_grad, rows, queries, keys), soft_embeddings) \
        if self_conditioning else 0.0  # the prefix copy of the drawn rows; the decoder, then the logit chunks
    cross_entropy = logit_chunk_bytes(dims, rows * max(queries, shape.response), LOGIT_COPIES_CROSS_ENTROPY)
    decoder_backward = (BACKWARD_TRANSIENT_LAYERS + (RECOMPUTED_LAYER_FACTOR if checkpointing else 0.0)) \
        * decoder_layer
    encoder_backward = BACKWARD_TRANSIENT_LAYERS * encoder_layer + prefix  # + gradients of the KV prefix
    small = small_tensors(dims, 1, length, length, s) + small_tensors(dims, rows, queries, keys, s)
    base = encoder + prefix + small
    decoder_workset = _workset(dims, regime, rows, queries, keys)
    phases = {
        "encoder forward": base + _workset(dims, regime, rows, length, length),
        "self-conditioning pass": base + sc_pass,
        "decoder forward": base + signal + decoder + decoder_workset,
        "cross-entropy": base + signal + decoder + cross_entropy,
        "decoder backward": base + signal + decoder + decoder_backward,
        "encoder backward": base + encoder_backward,
    }
    components = {  # (t): transient, alive in one phase only
        "encoder (saved for backward)": encoder,
        "KV prefix": prefix,
        "decoder (saved for backward)": decoder,
        "self-conditioning pass (t)": sc_pass,
        "decoder layer working set (t)": decoder_workset,
        "cross-entropy chunk (t)": cross_entropy,
        "decoder backward (t)": decoder_backward,
        "encoder backward + KV grads (t)": encoder_backward,
        "masks, rotary tables": small,
    }
    return Activations(components, phases)


def sampler_activations(dims: ModelDims, act_bytes: int, rows: int, tokens: TokenPlan, scores: bool) -> Activations:
    """The sampler at `rows` prompts: the prompt's encoding, then, at the last block (the longest prefix), one
    no-grad decoder step over rows x canvas tokens with its logit chunks and soft embeddings."""
    regime = Regime(act_bytes=act_bytes, scores=scores)
    canvas, hidden = dims.canvas, dims.hidden
    prompt = tokens.eval_prompt
    prefix_length = prompt + (tokens.eval_blocks - 1) * canvas
    keys = prefix_length + canvas
    prefix = SAMPLER_PREFIX_COPIES * kv_prefix_bytes(dims, rows, prefix_length, act_bytes)
    step = (_workset(dims, regime, rows, canvas, keys) + 2 * small_tensors(dims, rows, canvas, keys, act_bytes)
            + rows * canvas * hidden * (FLOAT32 + act_bytes))
    logits = logit_chunk_bytes(dims, rows * canvas, LOGIT_COPIES_SAMPLER)
    soft = 2 * rows * canvas * hidden * act_bytes  # this step's soft embeddings and the next step's
    encoding = (kv_prefix_bytes(dims, rows, prompt, act_bytes) + _workset(dims, regime, rows, prompt, prompt)
                + small_tensors(dims, rows, prompt, prompt, act_bytes))
    components = {f"KV prefix ({SAMPLER_PREFIX_COPIES:g} copies)": prefix, "decoder step (t)": step,
                  "logit chunk (t)": logits, "soft embeddings": soft, "prompt encoding (t)": encoding}
    return Activations(components, {"prompt encoding": encoding, "denoising step": prefix + soft + max(step, logits)})


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class GpuFit:
    name: str
    gib: int
    usable_bytes: float
    training_no_checkpointing: bool
    training_checkpointing: bool
    sampler: bool
    largest_eval_batch: int


@dataclass
class MemoryPlan:
    """Everything `dgemma-ft estimate` reports; bytes throughout."""

    model: str
    config_source: str
    dtype: str
    load_in_4bit: bool
    finetune: str
    parts: list[PartWeights]
    buffers: int
    total_parameters: int
    active_parameters: int
    trainable_parameters: int
    trainable_dtype: str
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    dequantized_weight_bytes: int
    tokens: TokenPlan
    step: StepShape
    checkpointing: bool
    activations: dict[str, Activations]  # "off" / "on": without / with gradient checkpointing
    training_peak: dict[str, float]
    eval_batch: int
    sampler: Activations
    sampler_peak: float
    gpus: list[GpuFit]
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(part.bytes for part in self.parts)

    def to_dict(self) -> dict:
        data = asdict(self)
        for name, acts in self.activations.items():
            data["activations"][name]["peak"] = acts.peak
            data["activations"][name]["peak_phase"] = acts.peak_phase
        data["sampler"]["peak"] = self.sampler.peak
        data["weight_bytes"] = self.weight_bytes
        data["step"].update(decoder_queries=self.step.decoder_queries, decoder_keys=self.step.decoder_keys)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def plan_dtype(recipe: Recipe, tiny: bool) -> str:
    """The dtype the plan assumes: the recipe's, `auto` being bf16 on the GPUs the plan is for (float32 for the
    tiny CPU model)."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return "float32" if tiny else "bfloat16"


def active_parameters(parts: list[PartWeights], dims: ModelDims) -> int:
    """Text parameters one token runs through: all but the experts, plus top_k of the experts."""
    text = sum(p.parameters for p in parts if p.part != "vision")
    experts = sum(p.parameters for p in parts if p.part == "experts")
    return text - experts + experts * dims.top_k // dims.experts


def largest_batch(fits) -> int:
    """The largest batch `fits(batch)` accepts (0 if none), by doubling then bisection."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_EVAL_BATCH and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return min(low, MAX_EVAL_BATCH)


def trainable_parameters(recipe: Recipe, dims: ModelDims, parts: list[PartWeights], dtype: str) -> tuple[int, str]:
    """(count, dtype) of what the optimizer updates: the shared adapter, which PEFT keeps in float32 under a
    16-bit base (`autocast_adapter_dtype`), or every text parameter in the model's dtype (`finetune: full`)."""
    if recipe.finetune == "lora":
        return lora_parameters(dims, recipe.lora.r, recipe.lora.targets), "float32"
    return sum(p.parameters for p in parts if p.part != "vision"), dtype


def training_regime(recipe: Recipe, dtype: str, scores: bool) -> Regime:
    """What the training step's passes keep: 16-bit activations (autocast on GPU) with float32 adapters, whose
    inputs are then copied, or float32 throughout."""
    act_bytes = DTYPE_BYTES[dtype]
    if recipe.finetune == "full":
        return Regime(act_bytes=act_bytes, full=True, scores=scores)
    return Regime(act_bytes=act_bytes, lora_targets=tuple(recipe.lora.targets), lora_rank=recipe.lora.r,
                  lora_copies=act_bytes < FLOAT32, scores=scores)


def gpu_fits(training_peak: dict[str, float], inference_resident: float, sampler_at) -> list[GpuFit]:
    """For each GPU size: does the training step fit (without and with gradient checkpointing), does the sampler
    at the eval batch, and the largest eval batch that does. `sampler_at(batch)`: the sampler's activations."""
    eval_peak = inference_resident + sampler_at(None)
    fits = []
    for name, size in GPUS:
        usable = size * GIB * (1 - HEADROOM)
        largest = largest_batch(lambda batch: inference_resident + sampler_at(batch) <= usable)
        fits.append(GpuFit(name=name, gib=size, usable_bytes=usable,
                           training_no_checkpointing=training_peak["off"] <= usable,
                           training_checkpointing=training_peak["on"] <= usable, sampler=eval_peak <= usable,
                           largest_eval_batch=largest))
    return fits


def estimate(recipe: Recipe, *, batch_size: int | None = None, checkpointing: bool | None = None,
             prompt_tokens: int | None = None, response_tokens: int | None = None,
             scores_materialised: bool | None = None,
             four_bit_parts: frozenset[str] = FOUR_BIT_PARTS) -> MemoryPlan:
    """The memory plan of `recipe`, from its model's config (no weights). `scores_materialised` defaults to
    True for eager attention only: sdpa's kernels on GPU (memory-efficient) and on CPU (flash) never build the
    score matrix; its math fallback does, which `True` models."""
    source = resolve_model(recipe.model)
    model = meta_model(source.config)
    dims = model_dims(model)
    dtype = plan_dtype(recipe, source.tiny)
    quantized = four_bit_parts if recipe.model.load_in_4bit else frozenset()
    parts = weight_census(model, dtype, quantized)
    trainable, trainable_dtype = trainable_parameters(recipe, dims, parts, dtype)
    trainable_bytes = trainable * DTYPE_BYTES[trainable_dtype]
    adapter_bytes = trainable_bytes if recipe.finetune == "lora" else 0  # full: the weights themselves
    scores = recipe.model.attn_implementation == "eager" if scores_materialised is None else scores_materialised
    tokens = token_plan(recipe, source, dims.canvas, prompt_tokens, response_tokens)
    shape = step_shape(recipe, tokens, dims.canvas, batch_size or recipe.train.batch_size)
    regime = training_regime(recipe, dtype, scores)
    activations = {setting: training_activations(dims, regime, shape, setting == "on",
                                                 recipe.train.self_conditioning_p > 0) for setting in ("off", "on")}
    dequantized = _largest_dequantized(dims, quantized, DTYPE_BYTES[dtype])
    inference_resident = sum(p.bytes for p in parts) + buffer_bytes(model) + adapter_bytes + dequantized
    optimizer_bytes = 2 * trainable_bytes  # AdamW's two moments, in the trainable parameters' dtype
    training_resident = inference_resident + trainable_bytes + optimizer_bytes  # + gradients
    training_peak = {setting: training_resident + acts.peak for setting, acts in activations.items()}
    eval_batch = recipe.eval.batch_size if isinstance(recipe.eval.batch_size, int) else AUTO_EVAL_BATCH
    sampler = sampler_activations(dims, DTYPE_BYTES[dtype], eval_batch, tokens, scores)
    use_checkpointing = recipe.train.gradient_checkpointing if checkpointing is None else checkpointing

    def sampler_at(batch: int | None) -> float:
        return sampler_activations(dims, DTYPE_BYTES[dtype], batch or eval_batch, tokens, scores).peak

    return MemoryPlan(
        model=recipe.model.name, config_source=source.label, dtype=dtype, load_in_4bit=recipe.model.load_in_4bit,
        finetune=recipe.finetune, parts=parts, buffers=buffer_bytes(model),
        total_parameters=sum(p.parameters for p in parts), active_parameters=active_parameters(parts, dims),
        trainable_parameters=trainable, trainable_dtype=trainable_dtype, adapter_bytes=adapter_bytes,
        gradient_bytes=trainable_bytes, optimizer_bytes=optimizer_bytes, dequantized_weight_bytes=dequantized,
        tokens=tokens, step=shape, checkpointing=use_checkpointing, activations=activations,
        training_peak=training_peak, eval_batch=eval_batch, sampler=sampler,
        sampler_peak=inference_resident + sampler.peak,
        gpus=gpu_fits(training_peak, inference_resident, sampler_at),
        notes=_notes(recipe, tokens, scores, eval_batch, quantized))


def _largest_dequantized(dims: ModelDims, quantized: frozenset[str], act_bytes: int) -> int:
    """Bytes dequantized for one matmul at a time: the largest quantized linear, or one expert's `gate_up_proj`
    (4-bit experts dequantize only the routed expert's matrix, with its float32 block scales; measured on CPU
    with `dgemma_ft.memory_meter.PeakMemory`, `tests/test_experts_4bit.py`: the transient of a layer's experts
    forward and backward stays under one such matrix)."""
    names = {"attention": ATTENTION_LINEARS, "dense_mlp": MLP_LINEARS}
    wanted = {name for part in quantized for name in names.get(part, ())}
    sizes = [i * o * act_bytes for layer in dims.layers for name, (i, o) in layer.linears.items() if name in wanted]
    if "experts" in quantized:
        expert = 2 * dims.moe_intermediate * dims.hidden
        sizes.append(expert * act_bytes + math.ceil(expert / NF4_BLOCK) * FLOAT32)
    return max(sizes, default=0)


def _notes(recipe: Recipe, tokens: TokenPlan, scores: bool, eval_batch: int,
           quantized: frozenset[str] = FOUR_BIT_PARTS) -> list[str]:
    notes = [f"a GPU fits when the peak stays under {100 - HEADROOM * 100:.0f}% of its memory (the rest is left "
             f"for the CUDA context, cuBLAS workspaces and fragmentation); * marks the recipe's checkpointing",
             "(t): transient, alive during one phase of the step; the peak is that of the largest phase",
             f"tokens: {tokens.source}; the longest of {SAMPLE_EXAMPLES} sampled examples "
             f"(override with --prompt-tokens/--response-tokens)",
             "self-conditioning: worst case, every row of the batch drawn for the no-grad first pass"]
    if scores:
        notes.append("attention scores materialised (eager attention or sdpa's math kernel)")
    if recipe.eval.batch_size == "auto":
        notes.append(f"eval.batch_size is auto: the sampler is shown at {eval_batch}; the GPU table gives the "
                     f"largest batch that fits")
    if recipe.model.load_in_4bit and "experts" in quantized:
        notes.append("4-bit: text-layer linears and experts in NF4 (experts dequantized one routed expert at a "
                     "time); embeddings, router, self-conditioning, norms and vision stay in 16-bit")
    elif recipe.model.load_in_4bit:
        notes.append("4-bit: text-layer linear weights in NF4; experts, embeddings, router, self-conditioning and "
                     "vision stay in 16-bit")
    return notes
