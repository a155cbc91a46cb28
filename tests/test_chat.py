"""One rule for where a chat example's answer is, for training (the target) and inference (the prompt, the
reference): the last message, when it is the assistant's."""

import pytest

from dgemma_ft.chat import prompt_ids, split_answer
from dgemma_ft.errors import UserError
from dgemma_ft.finetune.data import encode_example
from dgemma_ft.finetune.tiny import TinySpec, build_tiny_model

USER = {"role": "user", "content": "1000\n0002"}
ANSWER = {"role": "assistant", "content": "1234\n3412"}


def test_only_a_last_assistant_message_is_the_answer():
    assert split_answer([USER, ANSWER]) == ([USER], "1234\n3412")
    assert split_answer([ANSWER, USER]) == ([ANSWER, USER], None)
    assert split_answer([]) == ([], None)


def test_training_and_inference_see_the_same_prompt():
    _, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                                             global_head_dim=16, moe_intermediate_size=16))
    row = encode_example(tokenizer, [USER, ANSWER], canvas_length=8)
    assert row["input_ids"][:row["prompt_length"]] == prompt_ids(tokenizer, [USER, ANSWER]) \
        == prompt_ids(tokenizer, [USER])
    with pytest.raises(UserError, match="must end with an assistant message"):
        encode_example(tokenizer, [USER], canvas_length=8)
