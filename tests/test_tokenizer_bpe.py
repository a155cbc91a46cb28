"""Pins and character spans with a real multi-character tokenizer: a BPE trained here (merges across digits,
spaces and newlines, byte fallback for unseen characters) with Gemma's specials and the tiny chat template.
Pins must agree with the canonical tokenization of the reference answer, spans must reproduce the decoded text
(byte tokens included), violations must land on exactly the tokens covering the bad characters, and the whole
evaluation must run with this tokenizer."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast

from dgemma_ft.finetune.tiny import CHARACTERS, CHAT_TEMPLATE, SPECIAL_TOKENS, TinySpec, build_tiny_model, \
    build_tiny_tokenizer
from dgemma_ft.inference import constraints
from dgemma_ft.inference.constraints import char_offsets, pinned_tokens, special_token_ids, violation_checker
from dgemma_ft.inference.evaluate import Setting, evaluate_setting, make_requests
from dgemma_ft.inference.sampling import BlockDiffusionSampler, SamplerConfig
from dgemma_ft.tasks import RowError, SourceSpec, get_task
from dgemma_ft.tasks.sudoku import Grid, SudokuTask

UNSEEN = "é→日✓"  # never in the training corpus: only byte tokens can write these


# ------------------------------------------------------------------------------------------------ tokenizer
def _corpus(seed: int = 7) -> list[str]:
    """Sudoku grids and prompts, JSON, and numbers with spaces and newlines: enough for merges like "12",
    "34\\n" and " 1" to be learnt."""
    rng = random.Random(seed)
    sudoku, js = get_task("sudoku", {"box_rows": 2, "box_cols": 2}), get_task("json", {})
    texts = []
    for example in sudoku.generate(150, seed):
        texts += [sudoku.target(example), sudoku.prompt(example)]
    for example in js.generate(60, seed):
        texts += [js.target(example), js.prompt(example)]
    for _ in range(150):
        texts.append(" ".join(str(rng.randint(0, 999)) for _ in range(5)) + "\n" + str(rng.randint(0, 99)))
    return texts


def train_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A BPE with byte fallback trained in-process, wrapped like the released model's tokenizer: Gemma's specials
    at Gemma's ids (pad 0, eos 1, bos 2), the 256 byte tokens, and the tiny chat template."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=CHARACTERS, show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte fallback writes unseen characters as <0xXX> tokens, which must exist
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer()


@pytest.fixture(scope="module")
def sudoku():
    return get_task("sudoku", {"box_rows": 2, "box_cols": 2})


@pytest.fixture(scope="module")
def puzzles(sudoku):
    return [dict(row) for row in sudoku.build_dataset("eval", SourceSpec(source="generate", size=50, seed=1))]


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def _reference(example: dict) -> str:
    return example["messages"][-1]["content"]


def _without_reference(example: dict) -> dict:
    return dict(example, messages=example["messages"][:-1])


def _assert_spans_cover(text: str, spans: list[tuple[int, int]]) -> None:
    """Spans are monotonic and tile the text: each either repeats the previous one (tokens forming one
    character together) or starts where it ended; joining the distinct ones gives the text back."""
    position, previous, pieces = 0, None, []
    for span in spans:
        start, end = span
        assert start <= end
        if span == previous and start < end:
            continue
        assert start == position, (spans, text)
        pieces.append(text[start:end])
        position, previous = end, span
    assert position == len(text) and "".join(pieces) == text


def test_bpe_merges_across_digits_and_newlines_and_falls_back_to_bytes(bpe):
    pieces = [bpe.decode([i]) for i in range(len(bpe)) if i not in special_token_ids(bpe)]
    assert any(len(p) > 1 and any(c.isdigit() for c in p) for p in pieces)
    assert any(len(p) > 1 and "\n" in p for p in pieces)
    assert any(len(p) > 1 and " " in p and any(c.isdigit() for c in p) for p in pieces)
    grid = "1234\n3412\n4123\n2341"
    ids, _ = _encode(bpe, grid)
    assert len(ids) < len(grid)  # really multi-character
    for char in UNSEEN:
        ids, _ = _encode(bpe, char)
        assert len(ids) == len(char.encode()) and all(bpe.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
        assert bpe.decode(ids) == char
    assert [bpe.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:3]] == [0, 1, 2]
    prompt = bpe.apply_chat_template([{"role": "user", "content": "1000"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<bos><|turn>user\n1000<turn|>\n<|turn>model\n"


# ----------------------------------------------------------------------------------------------------- pins
def test_pins_agree_with_the_reference_tokenization(bpe, sudoku, puzzles):
    total = multi = 0
    for example in puzzles:
        canonical, offsets = _encode(bpe, _reference(example))
        given = sudoku.pinned(example)
        for probe in (example, _without_reference(example)):  # the second falls back on task.target()
            pins = pinned_tokens(sudoku, probe, bpe)
            for index, token in pins.items():
                assert canonical[index] == token, (example["puzzle"], index)
                start, end = offsets[index]
                assert all(o in given for o in range(start, end))
            total += len(pins)
            multi += sum(offsets[i][1] - offsets[i][0] > 1 for i in pins)
    assert total > 0 and multi > 0  # pins fire, whole multi-character givens among them


def test_pins_hold_for_every_solution_of_ambiguous_puzzles(bpe, sudoku):
    """d1 has 124 puzzles with several solutions: a pin must hold whichever one the model writes."""
    rows = [dict(row) for row in sudoku.build_dataset("eval", SourceSpec(source="sudoku4/d1_test.jsonl"))]
    ambiguous = [row for row in rows if row.get("n_solutions") != 1]
    assert len(ambiguous) > 100
    grid = Grid.of(2, 2)
    checked = 0
    for example in ambiguous:
        solutions = grid.solve([int(c) for c in example["puzzle"]], limit=100)
        assert len(solutions) > 1
        answers = [_encode(bpe, grid.layout(solution))[0] for solution in solutions]
        for index, token in pinned_tokens(sudoku, example, bpe).items():
            assert all(index < len(ids) and ids[index] == token for ids in answers), example["puzzle"]
            checked += 1
    assert checked > 0


def test_a_single_filler_draft_would_pin_wrong_tokens(bpe, sudoku, puzzles):
    """Why several drafts: the old rule (one "0"-filled draft, single-character tokens on givens) drifts."""
    wrong = 0
    for example in puzzles:
        given = sudoku.pinned(example)
        draft = "".join(given.get(o, "0") for o in range(max(given) + 1))
        canonical, _ = _encode(bpe, _reference(example))
        ids, offsets = _encode(bpe, draft)
        wrong += sum(end - start == 1 and start in given and (index >= len(canonical) or canonical[index] != token)
                     for index, (token, (start, end)) in enumerate(zip(ids, offsets)))
    assert wrong > 0


class _Untargeted(SudokuTask):
    """Sudoku that cannot state its target: pins come from fillings of the unknown characters alone."""

    def target(self, example):
        raise RowError("no target")


def test_tiny_character_tokenizer_pins_every_given(sudoku, puzzles):
    tiny = build_tiny_tokenizer()
    blind = _Untargeted({"box_rows": 2, "box_cols": 2})
    n = 4
    for example in puzzles:
        expected = {r * (n + 1) + c: tiny.convert_tokens_to_ids(digit)
                    for cell, digit in enumerate(example["puzzle"]) if digit != "0"
                    for r, c in [divmod(cell, n)]}
        assert pinned_tokens(sudoku, example, tiny) == expected
        assert pinned_tokens(blind, _without_reference(example), tiny) == expected


# ---------------------------------------------------------------------------------------------------- spans
def test_char_offsets_reproduce_sudoku_answers(bpe, puzzles):
    for example in puzzles:
        reference = _reference(example)
        ids, offsets = _encode(bpe, reference)
        text, spans = char_offsets(bpe, ids)
        assert text == reference and spans == offsets
        _assert_spans_cover(text, spans)


def test_char_offsets_with_specials_and_unfinished_bytes(bpe):
    ids, _ = _encode(bpe, "12→34")
    eos, end = bpe.eos_token_id, bpe.convert_tokens_to_ids("<turn|>")
    text, spans = char_offsets(bpe, [eos] + ids + [end, eos])
    assert text == "12→34" and spans[0] == (0, 0) and spans[-2:] == [(5, 5), (5, 5)]
    _assert_spans_cover(text, spans)
    cut = _encode(bpe, "ab→")[0][:-1]  # the arrow's last byte is missing: decoding shows replacement chars
    text, spans = char_offsets(bpe, cut)
    assert text == bpe.decode(cut, skip_special_tokens=True) and text.startswith("ab")
    _assert_spans_cover(text, spans)


@pytest.fixture(params=["stream", "prefixes"])
def decoding(request, monkeypatch):
    """Both ways of finding spans: the streaming decoder and, without it, growing prefixes."""
    if request.param == "prefixes":
        monkeypatch.setattr(constraints, "DecodeStream", None)
    return request.param


def test_json_with_non_ascii_text_round_trips(bpe, decoding):
    task = get_task("json", {})
    example = dict(task.build_dataset("eval", SourceSpec(source="generate", size=5, seed=3))[0])
    value = json.loads(_reference(example))
    value["note"] = f"Zoë {UNSEEN} ok"  # any string: only the decoding is under test here
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    ids, offsets = _encode(bpe, text)
    decoded, spans = char_offsets(bpe, ids)
    assert decoded == text and spans == offsets
    _assert_spans_cover(decoded, spans)
    arrow = text.index("→")
    covering = [i for i, (start, end) in enumerate(spans) if start <= arrow < end]
    assert len(covering) == 3 and bpe.decode([ids[i] for i in covering]) == "→"
    broken = text.replace(":", "→", 1)  # the JSON error sits on a three-byte character
    bad_ids, bad_offsets = _encode(bpe, broken)
    flagged = violation_checker(task, example, bpe)(bad_ids)
    bad = task.violations(example, broken)
    assert bad == [broken.index("→")]
    assert flagged == [i for i, (start, end) in enumerate(bad_offsets) if start <= bad[0] < end]
    assert len(flagged) == 3


# ----------------------------------------------------------------------------------------------- violations
def _corrupt(sudoku, example: dict, rng: random.Random) -> str:
    """The reference with a given changed and a blank set to a digit its row already holds."""
    text = list(_reference(example))
    given = sudoku.pinned(example)
    offset = rng.choice(sorted(given))
    text[offset] = str(int(text[offset]) % 4 + 1)
    blanks = [o for o in range(len(text)) if text[o].isdigit() and o not in given]
    if blanks:
        blank = rng.choice(blanks)
        row = blank - blank % 5
        text[blank] = next(text[o] for o in range(row, row + 4) if o != blank)
    return "".join(text)


def test_violations_flag_exactly_the_tokens_covering_bad_cells(bpe, sudoku, puzzles, decoding):
    rng = random.Random(0)
    for example in puzzles:
        draft = _corrupt(sudoku, example, rng)
        ids, offsets = _encode(bpe, draft)
        bad = set(sudoku.violations(example, draft))
        assert bad
        expected = [i for i, (start, end) in enumerate(offsets) if any(start <= o < end for o in bad)]
        assert violation_checker(sudoku, example, bpe)(ids) == expected
        covered = {o for i in expected for o in range(*offsets[i])}
        assert bad <= covered


# ----------------------------------------------------------------------------------------------- end to end
def test_evaluation_runs_with_the_bpe_tokenizer(bpe, sudoku, puzzles):
    spec = TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16, global_head_dim=16,
                    moe_intermediate_size=16, sliding_window=8, canvas_length=16, seed=3)
    model, tokenizer = build_tiny_model(spec, tokenizer=bpe)
    model.eval()
    examples = [example for example in puzzles if pinned_tokens(sudoku, example, bpe)][:2] + puzzles[:1]
    setting = Setting(steps=2, pin=True, renoise=True)
    result = evaluate_setting(model, tokenizer, sudoku, examples, setting, batch_size=3, seed=0, max_new_tokens=32)
    assert result.examples == 3 and len(result.records) == 3
    requests = make_requests(sudoku, examples, tokenizer, seed=0)
    assert any(request.pinned for request in requests)
    config = SamplerConfig.from_model(model, max_denoising_steps=2, max_new_tokens=32)
    sampler = BlockDiffusionSampler(model, config, special_token_ids=special_token_ids(tokenizer))
    generations = sampler.generate(requests, pin=True, renoise=True)
    fixed = 0
    for example, request, generation, record in zip(examples, requests, generations, result.records):
        text, spans = char_offsets(tokenizer, generation.token_ids)
        assert text == record["output"]  # the same run as the evaluation's
        given = sudoku.pinned(example)
        for index, token in request.pinned.items():
            assert generation.token_ids[index] == token
        lead = 0
        while lead in request.pinned:  # an unbroken run of pins from the start also fixes character offsets
            start, end = spans[lead]
            assert all(text[o] == given[o] for o in range(start, end))
            lead += 1
        fixed += lead
    assert fixed > 0
