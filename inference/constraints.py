"""Map a task's character-level hooks (`pinned`, `violations`) onto answer token positions.

Tasks speak in character offsets of the target text so they never depend on a tokenizer. The sampler speaks in
answer token indices. Real tokenizers have tokens spanning several characters (BPE merges such as "12" or
"34\n") and byte-fallback tokens (several tokens form one character), so:

- a pin {index: token} is kept only when it holds for the answer the model should write and for its likely
  alternatives: the token covers pinned characters only, and its index, id and span are the same in the
  canonical tokenization of the reference answer (the example's target) and of fillings of the reference's
  open characters with others of their kind (other digits: other solutions) covering every pair of
  neighbours, since BPE merges are decided by neighbours (`pinned_tokens`). Anything else stays free, never
  wrong. Without any reference the fillings alone decide, which is a best effort for merging tokenizers. With
  one token per character (the tiny tokenizer) every given becomes a pin.
- character spans of an answer's tokens come from streaming (or growing-prefix) decoding, never from decoding
  each token alone, whose length drifts under byte fallback (`char_offsets`).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable

try:  # tokenizers >= 0.21; without it `char_offsets` decodes growing prefixes
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed tokenizers
    DecodeStream = None

from dgemma_ft.chat import split_answer

LAYOUT = "\n"  # without a reference, unknown characters may also be line breaks (where rows end)
SUFFIX = 8  # without a reference, characters tried after the last pinned one (a pin must not merge with them)
MAX_DRAFTS = 128  # fillings tried per example: every pair of neighbours for up to 11 characters per offset
KINDS = (string.digits, string.ascii_lowercase, string.ascii_uppercase)  # a pinned character brings its kind

Span = tuple[int, int]


# ------------------------------------------------------------------------------------------------- pinning
def pinned_tokens(task, example: dict, tokenizer) -> dict[int, int]:
    """{answer token index: token id} for the task's pinned characters, keeping only pins that hold in the
    reference answer and in every tried filling of its open characters (see `_drafts`)."""
    pinned = task.pinned(example)
    if not pinned:
        return {}
    agreed: dict[int, tuple[int, Span]] | None = None
    for ids, spans in _tokenized(tokenizer, _drafts(pinned, _reference(task, example, pinned))):
        if agreed is None:
            agreed = {i: (token, span) for i, (token, span) in enumerate(zip(ids, spans))
                      if span[1] > span[0] and all(o in pinned for o in range(*span))}
        else:
            agreed = {i: pin for i, pin in agreed.items() if i < len(ids) and (ids[i], spans[i]) == pin}
        if not agreed:
            return {}
    return {index: token for index, (token, _) in sorted((agreed or {}).items())}


def _reference(task, example: dict, pinned: dict[int, str]) -> str | None:
    """The answer the model should write, so every pin must hold for it: the example's last assistant message,
    else the task's own target for it; None when neither exists or it contradicts the pinned characters."""
    text = split_answer(example.get("messages") or [])[1]
    if text is None:
        try:
            text = task.target(example)
        except Exception:  # e.g. a puzzle without a solution: pin from fillings alone
            text = None
    if not isinstance(text, str) or any(o >= len(text) or text[o] != c for o, c in pinned.items()):
        return None
    return text


def _choices(pinned: dict[int, str], reference: str | None) -> list[list[str]]:
    """The characters each offset of a completion may hold: its own where pinned; with a reference, the
    reference's own character where that has no kind (a line break, punctuation: the layout) and every character
    of the same kind seen in the reference or the givens otherwise (the digits of other solutions). Without
    one the layout is unknown: up to SUFFIX characters past the last pinned one, each open offset may hold any
    character of a pinned one's kind or a line break."""
    seen = set(pinned.values()) | set(reference or "")
    kinds = {kind: sorted(seen & set(kind)) for kind in KINDS}
    if reference is not None:
        return [[char] if o in pinned or _kind(char) is None else kinds[_kind(char)]
                for o, char in enumerate(reference)]
    alphabet = sorted(set(LAYOUT).union(seen, *(kind for kind in KINDS if seen & set(kind))))
    return [[pinned[o]] if o in pinned else alphabet for o in range(max(pinned) + 1 + SUFFIX)]


def _kind(char: str) -> str | None:
    """The KINDS entry holding `char` (None: layout or punctuation, kept as the reference has it)."""
    return next((kind for kind in KINDS if char in kind), None)


def _drafts(pinned: dict[int, str], reference: str | None) -> list[str]:
    """Completions of the pinned characters whose tokenizations must agree on a pin: the reference itself (when
    there is one) and fillings of the open offsets (see `_choices`) in which every two consecutive open offsets
    take every pair of their characters (open offset j holds choices[(p + q*j) % w] in filling (p, q)): BPE
    merges are decided by neighbours, "241\\n" and "2412" tokenize differently. Beyond MAX_DRAFTS fillings, q
    is thinned out and some pairs go untried."""
    choices = _choices(pinned, reference)
    open_ = [o for o, options in enumerate(choices) if len(options) > 1]
    width = max((len(choices[o]) for o in open_), default=1)
    steps = range(0, width, max(1, -(-width * width // MAX_DRAFTS)))
    drafts = [reference] if reference is not None else []
    for p in range(width):
        for q in steps:
            chars = [options[0] for options in choices]
            for j, o in enumerate(open_):
                chars[o] = choices[o][(p + q * j) % len(choices[o])]
            drafts.append("".join(chars))
    return drafts


def _tokenized(tokenizer, drafts: list[str]) -> list[tuple[list[int], list[Span]]]:
    """(token ids, character spans) of every draft that decodes back to itself; the others cannot be written
    with this tokenizer, so they are no possible answer (and no offset in them could be trusted)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(drafts, add_special_tokens=False, return_offsets_mapping=True)
        ids = [list(row) for row in encoded["input_ids"]]
        spans = [[tuple(span) for span in row] for row in encoded["offset_mapping"]]
    else:
        ids = [list(row) for row in tokenizer(drafts, add_special_tokens=False)["input_ids"]]
        spans = [char_offsets(tokenizer, row)[1] for row in ids]
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        texts = tokenizer.backend_tokenizer.decode_batch(ids, skip_special_tokens=True)  # what decode() gives
    else:
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [(row, row_spans) for draft, row, row_spans, text in zip(drafts, ids, spans, texts) if text == draft]


# ------------------------------------------------------------------------------------------ character spans
def char_offsets(tokenizer, token_ids: list[int],
                 skipped: Iterable[int] | None = None) -> tuple[str, list[Span]]:
    """The decoded text of `token_ids` (as `decode(..., skip_special_tokens=True)` gives it) and each token's
    (start, end) character span in it. Spans are monotonic and cover the text; the tokens that together form
    one character (byte fallback) all cover it; tokens that decode to nothing get an empty span. `skipped`:
    the ids decoding drops (default `special_token_ids(tokenizer)`; pass it when calling often)."""
    token_ids = [int(t) for t in token_ids]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    skipped = set(special_token_ids(tokenizer) if skipped is None else skipped)
    spans = _stream_spans(tokenizer, token_ids, text, skipped)
    return text, spans if spans is not None else _prefix_spans(tokenizer, token_ids, text)


def _stream_spans(tokenizer, token_ids: list[int], text: str, skipped: set[int]) -> list[Span] | None:
    """Spans from the tokenizer's streaming decoder, which emits each token's text in context (None while a
    character is incomplete: those tokens share the span of the text that completes them). None when the
    streaming decoder is unavailable or its text is not `text` (e.g. a decode that cleans up spaces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or backend is None:
        return None
    known = backend.get_vocab_size(with_added_tokens=True)
    stream = DecodeStream(skip_special_tokens=True)
    spans: list[Span] = []
    pieces: list[str] = []
    pending: list[int] = []
    position = 0
    try:
        for index, token in enumerate(token_ids):
            spans.append((position, position))
            if token in skipped or not 0 <= token < known:
                continue
            chunk = stream.step(backend, token)
            if chunk is None:
                pending.append(index)
                continue
            for held in pending + [index]:
                spans[held] = (position, position + len(chunk))
            pieces.append(chunk)
            pending = []
            position += len(chunk)
    except Exception:  # any decoder the stream cannot follow: use growing prefixes instead
        return None
    emitted = "".join(pieces)
    if not text.startswith(emitted) or (len(emitted) != len(text) and not pending):
        return None
    for held in pending:  # bytes still incomplete at the end: the decode shows replacement characters for them
        spans[held] = (position, len(text))
    return spans


def _prefix_spans(tokenizer, token_ids: list[int], text: str) -> list[Span]:
    """Spans from decoding growing prefixes: a token ends where its prefix stops agreeing with the full text;
    a prefix ending inside a character (a replacement character in place of it) also covers that character."""
    spans: list[Span] = []
    stable = 0
    for count in range(1, len(token_ids) + 1):
        prefix = tokenizer.decode(token_ids[:count], skip_special_tokens=True)
        common = _common_prefix(prefix, text)
        start, stable = stable, max(stable, common)
        end = stable if common == len(prefix) else min(len(text), stable + 1)
        spans.append((start, max(start, end)))
    return spans


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


# ------------------------------------------------------------------------------------------------ violations
def violation_checker(task, example: dict, tokenizer) -> Callable[[list[int]], list[int]]:
    """A function from a draft answer (token ids) to the token indices whose characters break a constraint:
    every token whose span touches a flagged character."""
    skipped = frozenset(special_token_ids(tokenizer))

    def check(token_ids: list[int]) -> list[int]:
        text, spans = char_offsets(tokenizer, token_ids, skipped)
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
