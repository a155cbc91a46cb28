"""Chat examples as the kit reads them: `messages`, a list of {"role", "content"}, whose last message, when it is
the assistant's, is the answer (the training target, the evaluation's reference) and everything before it the
prompt. One rule for training and inference, kept out of both so that neither imports the other for it."""

from __future__ import annotations

from typing import Any


def split_answer(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """(the prompt's messages, the answer's content): every message but the last assistant one, and that
    message's content; (all of them, None) when the last message is not the assistant's."""
    if messages and messages[-1].get("role") == "assistant":
        return list(messages[:-1]), messages[-1].get("content")
    return list(messages), None


def prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the prompt's messages (the answer, if any, dropped), with the model-turn opener appended."""
    context, _ = split_answer(messages)
    ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
