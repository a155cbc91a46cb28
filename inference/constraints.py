"""Map a task's character-level hooks (`pinned`, `violations`) onto answer token positions.

Tasks speak in character offsets of the target text so they never depend on a tokenizer. The sampler speaks in
answer token indices. A pinned character becomes a pinned token only when a token covers exactly that character
(true for digits and newlines in both the tiny and the Gemma tokenizers); anything else stays free, never wrong.
"""

from __future__ import annotations

from collections.abc import Callable

FILLER = "0"  # stands in for unknown characters when laying out pinned text


def pinned_tokens(task, example: dict, tokenizer) -> dict[int, int]:
    """{answer token index: token id} for the task's pinned characters."""
    pinned = task.pinned(example)
    if not pinned:
        return {}
    length = max(pinned) + 1
    draft = "".join(pinned.get(i, FILLER) for i in range(length))
    encoded = tokenizer(draft, add_special_tokens=False, return_offsets_mapping=True)
    result = {}
    for index, (token, (start, end)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        if end - start == 1 and start in pinned and draft[start] == pinned[start]:
            result[index] = token
    return result


def char_offsets(tokenizer, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `token_ids` and each token's (start, end) character span in it."""
    spans, text = [], ""
    for token in token_ids:
        piece = tokenizer.decode([token], skip_special_tokens=True)
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def violation_checker(task, example: dict, tokenizer) -> Callable[[list[int]], list[int]]:
    """A function from a draft answer (token ids) to the token indices whose characters break a constraint."""
    def check(token_ids: list[int]) -> list[int]:
        text, spans = char_offsets(tokenizer, token_ids)
        try:
            bad = set(task.violations(example, text))
        except Exception:  # a task hook must never break sampling
            return []
        return [i for i, (start, end) in enumerate(spans) if any(o in bad for o in range(start, end))]

    return check


def special_token_ids(tokenizer) -> list[int]:
    """Every id that decoding with `skip_special_tokens=True` drops (named specials and special added tokens)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return sorted(ids)
