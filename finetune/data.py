"""Turn chat examples into block-diffusion training rows and batches.

A row is the prompt (chat template with the generation prompt) followed by the response tokens, the end-of-turn
token, and EOS fill up to a whole number of canvases. Batches are right-padded, which the objective's masks
rely on (padding then sits after every real token, so causal attention never reads it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dgemma_ft.chat import prompt_ids, split_answer
from dgemma_ft.errors import UserError
from dgemma_ft.finetune.objective import BlockBatch

END_OF_TURN_TOKENS = ("<turn|>", "<end_of_turn>")


def end_of_turn_id(tokenizer) -> int:
    """The token that closes a model turn (Gemma 4: `<turn|>`), falling back to EOS."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return vocab[token]
    return tokenizer.eos_token_id


def encode_example(tokenizer, messages: list[dict[str, str]], canvas_length: int,
                   max_blocks: int | None = None) -> dict[str, Any]:
    """Prompt ids + EOS-filled response ids for one chat example."""
    target = split_answer(messages)[1]
    if not isinstance(target, str):
        raise UserError("a training example must end with an assistant message (the target)")
    prompt = prompt_ids(tokenizer, messages)
    response = tokenizer(target, add_special_tokens=False)["input_ids"]
    response = list(response) + [end_of_turn_id(tokenizer)]
    blocks = max(1, math.ceil(len(response) / canvas_length))
    if max_blocks is not None and blocks > max_blocks:
        raise UserError(f"a response of {len(response)} tokens needs {blocks} canvases of {canvas_length} but "
                        f"train.max_blocks is {max_blocks}: raise train.max_blocks (or the model's canvas_length), "
                        f"or shorten the task's targets")
    filled = response + [tokenizer.eos_token_id] * (blocks * canvas_length - len(response))
    return {"input_ids": prompt + filled, "prompt_length": len(prompt), "response_length": len(response),
            "num_blocks": blocks}


class BlockCollator:
    """Collate encoded rows into a right-padded `BlockBatch` (as a dict, which `Trainer` passes along)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row["input_ids"])] = torch.tensor(row["input_ids"], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "prompt_lengths": torch.tensor([row["prompt_length"] for row in rows]),
            "response_lengths": torch.tensor([row["response_length"] for row in rows]),
            "num_blocks": torch.tensor([row["num_blocks"] for row in rows]),
        }


def as_block_batch(inputs: dict[str, torch.Tensor]) -> BlockBatch:
    return BlockBatch(input_ids=inputs["input_ids"], prompt_lengths=inputs["prompt_lengths"],
                      response_lengths=inputs["response_lengths"], num_blocks=inputs["num_blocks"])


def encode_dataset(dataset, tokenizer, canvas_length: int, max_blocks: int | None = None):
    """Map a chat `datasets.Dataset` (column `messages`) to encoded rows."""
    def encode(row):
        return encode_example(tokenizer, row["messages"], canvas_length, max_blocks)

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing")
