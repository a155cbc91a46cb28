"""The built-in `tiny` DiffusionGemma: the real HF class at a size that trains on a laptop CPU, plus a
character-level tokenizer built in code. Both are deterministic from a seed and save with `save_pretrained`
like any checkpoint, so every command works without a GPU or the Hub."""

from __future__ import annotations

import string

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from dgemma_ft.errors import UserError

# Gemma-style ids for the specials, so pad/eos/bos sit where the released model has them.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
END_OF_TURN = "<turn|>"
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # letters, digits, punctuation, ' ', '\n'

# Same turn layout as the Gemma 4 template (bos, <|turn>role ... <turn|>), without tools or thinking.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


class TinySpec(BaseModel):
    """Size of the built-in tiny model (the recipe's `model.tiny`)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(32, gt=0)
    global_head_dim: int = Field(32, gt=0)
    num_experts: int = Field(4, gt=0)
    top_k_experts: int = Field(2, gt=0)
    moe_intermediate_size: int = Field(64, gt=0)
    sliding_window: int = Field(64, gt=1)
    sliding_pattern: int = Field(2, gt=0, description="every Nth layer uses full attention, the others sliding")
    canvas_length: int = Field(32, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    seed: int = 0

    @field_validator("head_dim", "global_head_dim")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even (rotary embeddings rotate channel pairs), e.g. {value + 1}")
        return value

    @field_validator("hidden_size", "moe_intermediate_size")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        lower = value - value % 8
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the grouped expert matmuls need 16-byte rows), e.g. "
                             f"{f'{lower} or ' if lower else ''}{lower + 8}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TinySpec:
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        fits = " or ".join(str(k) for k in range(1, heads + 1) if heads % k == 0 and heads % global_kv_heads(k) == 0)
        if heads % kv:
            raise ValueError(f"num_attention_heads must be a multiple of num_key_value_heads; use "
                             f"num_key_value_heads {fits}")
        if heads % global_kv_heads(kv):
            raise ValueError(f"num_key_value_heads {kv} does not fit num_attention_heads {heads}: the global layers' "
                             f"key/value heads (half of it, {global_kv_heads(kv)}) must divide num_attention_heads "
                             f"too; use num_key_value_heads {fits}")
        if self.top_k_experts > self.num_experts:
            raise ValueError("top_k_experts cannot exceed num_experts")
        return self


def global_kv_heads(num_key_value_heads: int) -> int:
    """Key/value heads of the full-attention layers: half the sliding layers' (at least one), as `tiny_config`
    sets them."""
    return max(1, num_key_value_heads // 2)


def build_tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with Gemma's specials and a Gemma-4-style chat template."""
    from transformers import PreTrainedTokenizerFast  # after unsloth: the CLI imports this module (via recipe) first

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(spec: TinySpec, vocab_size: int, image_token_id: int = 3):
    """A `DiffusionGemmaConfig` for `spec`. The vision tower cannot be dropped, so it gets a 1-layer toy one; the
    tokenizer has no image tokens, so the image token id points at `<unk>` (HF `generate()` reads it)."""
    from transformers import DiffusionGemmaConfig  # after unsloth (see build_tiny_tokenizer)

    layer_types = ["full_attention" if (i + 1) % spec.sliding_pattern == 0 else "sliding_attention"
                   for i in range(spec.num_hidden_layers)]
    layer_types[-1] = "full_attention"  # HF requires the last layer to be global
    text = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        global_head_dim=spec.global_head_dim, num_global_key_value_heads=global_kv_heads(spec.num_key_value_heads),
        sliding_window=spec.sliding_window, num_experts=spec.num_experts, top_k_experts=spec.top_k_experts,
        moe_intermediate_size=spec.moe_intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        layer_types=layer_types, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=spec.canvas_length,
                                boi_token_id=None, eoi_token_id=None, image_token_id=image_token_id)


def build_tiny_model(spec: TinySpec | None = None, tokenizer=None):
    """(model, tokenizer): a freshly initialised tiny DiffusionGemma, identical for identical spec and seed."""
    from transformers import DiffusionGemmaForBlockDiffusion  # after unsloth (see build_tiny_tokenizer)

    spec = spec or TinySpec()
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = tiny_config(spec, vocab_size=len(tokenizer), image_token_id=tokenizer.unk_token_id)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        model = DiffusionGemmaForBlockDiffusion(config)
        probe_forward(model)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def probe_forward(model) -> None:
    """One forward over a few tokens, so sizes the model class accepts but cannot run fail here, before a run
    folder exists, as one line (not at the first training step, as a traceback)."""
    ids = torch.full((1, 4), model.config.text_config.bos_token_id or 0, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        reason = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UserError(f"model.tiny: DiffusionGemma cannot run these sizes ({reason}); change the model.tiny "
                        f"sizes (e.g. back to the defaults)") from None
