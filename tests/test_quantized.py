"""QLoRA: `load_in_4bit` quantizes the text linears (NF4, bitsandbytes, which runs on CPU), keeps the encoder and
decoder sharing them, leaves the router / self-conditioning / vision tower in full precision, and trains one
shared LoRA adapter on top."""

import pytest
import torch

bitsandbytes = pytest.importorskip("bitsandbytes")

from dgemma_ft.finetune.lora import attach_lora  # noqa: E402
from dgemma_ft.finetune.model_loading import load_model  # noqa: E402
from dgemma_ft.finetune.objective import BlockBatch, ObjectiveConfig, block_diffusion_loss  # noqa: E402
from dgemma_ft.finetune.recipe import ModelSection  # noqa: E402
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model  # noqa: E402


def test_4bit_load_shares_quantized_linears_and_trains_lora(tmp_path):
    model, tokenizer = build_tiny_model(TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 head_dim=32, global_head_dim=64, moe_intermediate_size=32))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    quantized = load_model(ModelSection(name=str(tmp_path), load_in_4bit=True, dtype="float32")).model
    encoder = quantized.model.encoder.language_model.layers[0]
    decoder = quantized.model.decoder.layers[0]
    assert isinstance(encoder.self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    assert encoder.self_attn.q_proj is decoder.self_attn.q_proj and encoder.mlp.up_proj is decoder.mlp.up_proj
    assert type(encoder.router.proj) is torch.nn.Linear
    assert type(quantized.model.decoder.self_conditioning.gate_proj) is torch.nn.Linear

    draw = torch.Generator().manual_seed(0)  # fixed inputs: the NF4 error of a 64-wide model varies with them
    ids, canvas = torch.randint(6, 90, (2, 10), generator=draw), torch.randint(0, 90, (2, 32), generator=draw)
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=canvas).logits
        four = quantized(input_ids=ids, decoder_input_ids=canvas).logits
    assert torch.isfinite(four).all() and (four - full).abs().mean() < 0.5 * full.abs().mean()

    peft_model = attach_lora(quantized, r=4, alpha=8, dropout=0.0)
    batch = BlockBatch(torch.randint(6, 90, (2, 42)), torch.tensor([10, 10]), torch.tensor([20, 20]),
                       torch.tensor([1, 1]))
    loss = block_diffusion_loss(peft_model, batch, ObjectiveConfig()).loss
    loss.backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.grad is not None for _, p in trainable)


def test_4bit_lora_gradients_survive_an_evaluation_forward(tmp_path):
    """bitsandbytes repacks a CPU 4-bit linear for its inference kernel after one no-grad eval forward, and that
    kernel has no backward: without `keep_4bit_linears_differentiable` the LoRA gradients after an evaluation
    differ from those before it (by >100% here)."""
    import warnings

    model, tokenizer = build_tiny_model(TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 head_dim=32, global_head_dim=64, moe_intermediate_size=32))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    peft_model = attach_lora(load_model(ModelSection(name=str(tmp_path), load_in_4bit=True, dtype="float32")).model,
                             r=4, alpha=8, dropout=0.0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B: gradients then flow through every layer's input
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(6, 90, (2, 42), generator=torch.Generator().manual_seed(1))
    batch = BlockBatch(ids, torch.tensor([10, 10]), torch.tensor([20, 20]), torch.tensor([1, 1]))

    def gradients():
        peft_model.train()
        peft_model.zero_grad()
        torch.manual_seed(0)
        block_diffusion_loss(peft_model, batch, ObjectiveConfig(self_conditioning_p=0.0)).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    before = gradients()
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=ids[:, :10], decoder_input_ids=ids[:, 10:34])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gemv_4bit.*")
        after = gradients()
    assert before.keys() == after.keys() and before
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
