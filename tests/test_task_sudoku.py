"""Sudoku task: the public reference solutions are judged correct and their corruptions rejected, generation is
seeded and unique, sources and options fail with one clear line, and the validator never raises (its speed is
measured by benchmarks/sudoku_validation.py, not here)."""

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma_ft.errors import DataError, UserError
from dgemma_ft.tasks import SourceSpec, Verdict, get_task
from dgemma_ft.tasks.sudoku import Grid
from dgemma_ft.tasks.sudoku.grid import analyse_puzzle


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True)


@pytest.fixture(scope="module")
def task():
    return get_task("sudoku", {"box_rows": 2, "box_cols": 2})


@pytest.fixture(scope="module")
def public(task):
    dream = [dict(r) for r in task.build_dataset("eval", SourceSpec(source="sudoku4/dream_4x4.jsonl"))]
    d1 = [dict(r) for r in task.build_dataset("eval", SourceSpec(source="sudoku4/d1_test.jsonl"))]
    return dream, d1


def _replace(text: str, offset: int, char: str) -> str:
    return text[:offset] + char + text[offset + 1:]


# ------------------------------------------------------------------------------------------- public sets
def test_public_solutions_are_correct_and_corruptions_rejected(task, public):
    dream, d1 = public
    assert len(dream) == 972 and len(d1) == 500
    grid = task.grid
    for example in dream + d1:
        answer = task.target(example)
        verdict = task.validate(example, answer)
        assert verdict.correct and verdict.valid and verdict.score == 1.0, example["puzzle"]
        givens = [i for i, c in enumerate(example["puzzle"]) if c != "0"]
        blanks = [i for i, c in enumerate(example["puzzle"]) if c == "0"]
        # one changed digit in each blank cell, every other digit
        for cell in blanks:
            offset = grid.offset(cell)
            for digit in "1234":
                if digit != answer[offset]:
                    assert not task.validate(example, _replace(answer, offset, digit)).correct
        # one changed given
        offset = grid.offset(givens[0])
        changed = task.validate(example, _replace(answer, offset, str(int(answer[offset]) % 4 + 1)))
        assert changed.valid and not changed.correct and changed.reason.startswith("given changed at r")
        # still a valid grid, but givens changed: swap two digit symbols everywhere
        a = example["puzzle"][givens[0]]
        b = "2" if a == "1" else "1"
        swapped = answer.translate(str.maketrans(a + b, b + a))
        assert grid.is_solution([int(c) for c in swapped.replace("\n", "")])
        verdict = task.validate(example, swapped)
        assert not verdict.correct and "given changed" in verdict.reason
        # truncated
        for cut in (1, 5, len(answer)):
            verdict = task.validate(example, answer[:-cut])
            assert not verdict.valid and not verdict.correct and verdict.reason.startswith("expected 16 digits")


def test_several_solutions_every_valid_completion_is_correct(task, public):
    _, d1 = public
    multi = [e for e in d1 if e["n_solutions"] != 1]
    assert len(multi) == 124
    grid = task.grid
    for example in multi:
        solutions = grid.solve([int(c) for c in example["puzzle"]], limit=4)
        assert len(solutions) >= 2
        for solution in solutions:
            verdict = task.validate(example, grid.layout(solution))
            assert verdict.correct, (example["puzzle"], solution)
        other = next(s for s in solutions if "".join(map(str, s)) != example["solution"])
        assert task.validate(example, grid.layout(other)).correct


def test_lenient_parsing_and_reasons(task, public):
    example = public[0][20]
    answer = task.target(example)
    rows = answer.split("\n")
    for text in (" | ".join(" ".join(r) for r in rows), answer.replace("\n", ""),
                 "Here is the solved 4x4 grid\n" + answer + "\nDone, 42 steps.",
                 "Answer: " + answer, "\n\n".join(rows), json.dumps([[int(c) for c in r] for r in rows]),
                 "\n".join([" ".join(rows[0][:2]) + " | " + " ".join(rows[0][2:]),
                            " ".join(rows[1][:2]) + " | " + " ".join(rows[1][2:]), "----+----",
                            " ".join(rows[2][:2]) + " | " + " ".join(rows[2][2:]),
                            " ".join(rows[3][:2]) + " | " + " ".join(rows[3][2:])])):
        assert task.validate(example, text).correct, text
    assert task.validate(example, "").reason == "expected 16 digits, found 0"
    assert task.validate(example, answer[:14]).reason == "expected 16 digits, found 12"
    assert not task.validate(example, "0" * 16).correct
    # a blank cell left at 0, a duplicate
    blank = task.grid.offset(example["puzzle"].index("0"))
    verdict = task.validate(example, _replace(answer, blank, "0"))
    assert verdict.valid and "not a digit 1..4" in verdict.reason and verdict.details["givens_kept"] == \
        verdict.details["givens"]
    duplicate = task.validate(example, "1234\n1234\n1234\n1234")
    assert not duplicate.correct and 0.0 <= duplicate.score < 1.0


def test_partial_credit(task, public):
    dream, d1 = public
    example = next(e for e in dream if e["n_blanks"] == 12)
    answer = task.target(example)
    blanks = [task.grid.offset(i) for i, c in enumerate(example["puzzle"]) if c == "0"]
    wrong = _replace(answer, blanks[0], str(int(answer[blanks[0]]) % 4 + 1))
    assert task.validate(example, wrong).score == pytest.approx(11 / 12)
    several = next(e for e in d1 if e["n_solutions"] > 1)
    assert 0.0 <= task.validate(several, "1111\n2222\n3333\n4444").score < 1.0


# -------------------------------------------------------------------------------------------- generation
def test_generation_is_seeded_reproducible_and_in_range():
    task = get_task("sudoku", {"min_blanks": 6, "max_blanks": 11})
    first, again, other = task.generate(60, 3), task.generate(60, 3), task.generate(60, 4)
    assert first == again and first != other
    grid = task.grid
    assert {e["n_blanks"] for e in first} <= set(range(6, 12)) and len({e["n_blanks"] for e in first}) > 2
    for example in first:
        puzzle = [int(c) for c in example["puzzle"]]
        solution = [int(c) for c in example["solution"]]
        assert puzzle.count(0) == example["n_blanks"] and example["n_solutions"] == 1
        assert grid.count_solutions(puzzle) == 1
        assert grid.is_solution(solution) and all(not p or p == s for p, s in zip(puzzle, solution))
        assert task.validate(example, task.target(example)).correct


def test_nine_by_nine_puzzles_are_unique():
    nine = get_task("sudoku", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})
    examples = nine.generate(20, 0)
    assert examples == nine.generate(20, 0)
    for example in examples:
        assert 40 <= example["n_blanks"] <= 50 and len(example["puzzle"]) == 81
        assert nine.grid.count_solutions([int(c) for c in example["puzzle"]], limit=2) == 1
        solution = [int(c) for c in example["solution"]]
        assert nine.grid.is_solution(solution)
        assert all(p in ("0", s) for p, s in zip(example["puzzle"], example["solution"]))
        assert nine.validate(example, nine.target(example)).correct


def test_six_by_six_and_prompt_format():
    six = get_task("sudoku", {"box_rows": 2, "box_cols": 3, "min_blanks": 10, "max_blanks": 20})
    examples = six.generate(10, 7)
    for example in examples:
        assert len(example["puzzle"]) == 36 and 10 <= example["n_blanks"] <= 20
        assert six.grid.count_solutions([int(c) for c in example["puzzle"]]) == 1
        assert six.validate(example, six.target(example)).correct
    example = examples[0]
    rows = [example["puzzle"][r * 6:(r + 1) * 6] for r in range(6)]
    assert six.prompt(example) == "Solve this 6x6 Sudoku (2x3 boxes, 0 = blank):\n" + "\n".join(rows)
    target = six.target(example)
    assert target.split("\n") == [example["solution"][r * 6:(r + 1) * 6] for r in range(6)]
    # 2x3 boxes: two rows by three columns
    assert six.grid.box[3] == 1 and six.grid.box[6] == 0 and six.grid.box[12] == 2


def test_not_unique_mode_draws_any_blank_count():
    task = get_task("sudoku", {"unique": False, "min_blanks": 13, "max_blanks": 15})
    for example in task.generate(20, 0):
        assert 13 <= example["n_blanks"] <= 15
        assert task.validate(example, task.target(example)).correct


# ------------------------------------------------------------------------------------------------ sources
def test_build_dataset_excludes_keys_and_has_chat_messages(task):
    excluded = {task.key(e) for e in task.generate(100, 1)}
    data = task.build_dataset("train", SourceSpec(source="generate", size=200, seed=1), exclude_keys=excluded)
    assert len(data) == 200 and not excluded & {row["puzzle"] for row in data}
    assert task.last_report.excluded > 0
    row = dict(data[0])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"] == task.prompt(row)
    assert row["messages"][1]["content"] == task.target(row)
    assert task.default_size("train") == 20_000 and task.default_size("eval") == 500


def test_shipped_sets_load_and_keys(task):
    d1 = task.build_dataset("eval", SourceSpec(source="sudoku4/d1_test.jsonl"))
    assert len(d1) == 500
    keys = {task.key(dict(r)) for r in d1}
    dream = task.build_dataset("eval", SourceSpec(source="sudoku4/dream_4x4.jsonl"), exclude_keys=keys)
    assert len(dream) + task.last_report.excluded == 972


def test_bad_rows_are_reported_and_strict_mode_rejects(task, tmp_path):
    path = tmp_path / "puzzles.jsonl"
    path.write_text("\n".join([
        json.dumps({"puzzle": "1000000240030000", "solution": "1234341241232341"}),
        json.dumps({"puzzle": "1.00000240030000"}),  # fine: '.' is a blank, no solution (solved when needed)
        json.dumps({"puzzle": "10000002400300"}),  # wrong length
        json.dumps({"puzzle": "1100000240030000"}),  # givens break a rule
        "{not json",
        json.dumps({"puzzle": "1000000240030000", "solution": "2134342142131342"}),  # valid, but not the givens
        json.dumps({"quizz": "1000000240030000"}),  # no puzzle column
        json.dumps({"puzzle": "9" + "0" * 80}),  # a 9x9 row for a 4x4 task
    ]) + "\n")
    data = task.build_dataset("eval", SourceSpec(source=str(path)))
    assert len(data) == 2 and data[1]["solution"] == "1234341241232341"  # solved once, when the row was read
    assert task.target(dict(data[1])) == "1234\n3412\n4123\n2341"
    report = task.last_report
    assert len(report.bad) == 6 and "6 unusable row(s)" in report.summary()
    reasons = dict(report.bad)
    assert reasons[3] == "expected 16 cells for a 4x4 grid, got 14"
    assert "row 1 repeats 1" in reasons[4]
    assert "not valid JSON" in reasons[5]
    assert reasons[6] == "solution does not match the given at r1c1"
    assert "no puzzle column" in reasons[7]
    assert reasons[8] == "expected 16 cells for a 4x4 grid, got 81"
    with pytest.raises(DataError, match="row 3: expected 16 cells"):
        task.build_dataset("eval", SourceSpec(source=str(path), strict=True))


@pytest.mark.parametrize("options,field", [({"min_blanks": 9, "max_blanks": 5}, "min_blanks"),
                                           ({"box_rows": 4, "box_cols": 4}, "box_cols"),
                                           ({"box_rows": 0}, "box_rows"),
                                           ({"max_blanks": 16, "unique": False}, "max_blanks"),
                                           ({"max_blanks": 13}, "max_blanks"),
                                           ({"min_blanks": 0}, "min_blanks"),
                                           ({"blanks": 3}, "blanks")])
def test_option_errors_name_the_field(options, field):
    with pytest.raises(UserError, match=field) as caught:
        get_task("sudoku", options)
    assert "\n" not in str(caught.value)


def test_sapientinc_style_rows_and_column_mapping(tmp_path):
    nine = get_task("sudoku", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})
    examples = nine.generate(3, 5)
    path = tmp_path / "extreme.csv"
    path.write_text("source,question,answer,rating\n" + "".join(
        f"x,{e['puzzle'].replace('0', '.')},{e['solution']},3\n" for e in examples))
    data = nine.build_dataset("eval", SourceSpec(source=str(path)))
    assert [row["puzzle"] for row in data] == [e["puzzle"] for e in examples]
    row = dict(data[0])
    assert row["box_rows"] == 3 and nine.validate(row, nine.target(row)).correct
    assert nine.prompt(row).startswith("Solve this 9x9 Sudoku (3x3 boxes, 0 = blank):\n")
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text(json.dumps({"board": examples[0]["puzzle"].replace("0", "_"), "sol": examples[0]["solution"]})
                      + "\n")
    data = nine.build_dataset("eval", SourceSpec(source=str(mapped), columns={"puzzle": "board", "solution": "sol"}))
    assert dict(data[0])["solution"] == examples[0]["solution"]
    with pytest.raises(DataError, match="missing column 'grid'"):
        nine.build_dataset("eval", SourceSpec(source=str(mapped), columns={"puzzle": "grid"}, strict=True))
    # the 4x4 task checks rows against its own shape
    with pytest.raises(DataError, match="expected 16 cells for a 4x4 grid, got 81"):
        get_task("sudoku").build_dataset("eval", SourceSpec(source=str(path), strict=True))


def test_one_puzzle_per_line_txt(tmp_path):
    nine = get_task("sudoku", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})
    examples = nine.generate(5, 9)
    puzzles, solutions = [e["puzzle"] for e in examples], [e["solution"] for e in examples]
    wrong = solutions[1].translate(str.maketrans("12", "21"))
    path = tmp_path / "puzzles.txt"
    path.write_text("\n".join([
        puzzles[0].replace("0", "."),  # the classic format: 81 characters, '.' blanks
        puzzles[1],  # '0' blanks
        "",
        f"{puzzles[2]},{solutions[2]}",  # puzzle and solution on one line: comma, tab or space between
        f"{puzzles[3]}\t{solutions[3]}",
        f" {puzzles[4]} {solutions[4]} ",
        puzzles[0][:80],
        f"{puzzles[1]},{wrong}",
    ]) + "\n")
    data = nine.build_dataset("eval", {"source": str(path)})
    assert [row["puzzle"] for row in data] == puzzles
    assert [row["solution"] for row in data] == solutions
    assert all(nine.validate(dict(row), nine.target(dict(row))).correct for row in data)
    reasons = dict(nine.last_report.bad)
    assert reasons[7] == "expected 81 cells for a 9x9 grid, got 80" and len(reasons) == 2
    assert reasons[8].startswith("solution does not match the given at r")


def test_puzzle_only_rows_are_solved_once(tmp_path, monkeypatch):
    nine = get_task("sudoku", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})
    example = nine.generate(1, 31)[0]
    path = tmp_path / "puzzle_only.jsonl"
    path.write_text(json.dumps({"puzzle": example["puzzle"]}) + "\n")
    analyse_puzzle.cache_clear()  # a cached earlier solve would hide a second one
    calls, solve = [], Grid.solve
    monkeypatch.setattr(Grid, "solve", lambda self, *args, **kwargs: calls.append(1) or solve(self, *args, **kwargs))
    row = dict(nine.build_dataset("eval", {"source": str(path)})[0])
    answer = nine.target(row)
    assert row["solution"] == example["solution"] and nine.validate(row, answer).correct
    blank = nine.grid.offset(example["puzzle"].index("0"))
    wrong = nine.validate(row, _replace(answer, blank, str(int(answer[blank]) % 9 + 1)))
    assert not wrong.correct and 0.0 < wrong.score < 1.0
    assert len(calls) == 1


# ------------------------------------------------------------------------------------- pinned, violations
def test_pinned_and_violations(task, public):
    for example in public[0][::97] + public[1][::97]:
        target = task.target(example)
        pinned = task.pinned(example)
        assert len(pinned) == 16 - example["n_blanks"]
        assert all(target[offset] == char for offset, char in pinned.items())
        assert task.violations(example, target) == []
        # a changed given is reported at its offset
        offset = min(pinned)
        assert offset in task.violations(example, _replace(target, offset, str(int(target[offset]) % 4 + 1)))
        # a blank copying a digit of its row: the blank and the other non-given copy are reported
        cell = example["puzzle"].index("0")
        row = cell // 4
        other = next(c for c in range(row * 4, row * 4 + 4) if c != cell)
        draft = _replace(target, task.grid.offset(cell), target[task.grid.offset(other)])
        bad = task.violations(example, draft)
        assert task.grid.offset(cell) in bad
        assert (task.grid.offset(other) in bad) == (example["puzzle"][other] == "0")
        assert all(draft[o] in "1234" for o in bad)
        # not a digit
        assert task.violations(example, _replace(target, task.grid.offset(cell), "x")) == [task.grid.offset(cell)]
    example = public[0][0]
    assert task.violations(example, "") == []
    assert task.violations(example, "\n" * 19) == sorted(task.grid.offsets)


def test_pin_layout_pins_the_line_breaks_too(task):
    six = get_task("sudoku", {"box_rows": 2, "box_cols": 3, "pin_layout": True})
    example = dict(six.build_dataset("train", {"source": "generate", "size": 1, "seed": 0})[0])
    target, pinned = six.target(example), six.pinned(example)
    breaks = sorted(offset for offset, char in pinned.items() if char == "\n")
    assert breaks == [offset for offset, char in enumerate(target) if char == "\n"] == [6, 13, 20, 27, 34]
    assert all(target[offset] == char for offset, char in pinned.items())
    assert len(pinned) == 5 + sum(c != "0" for c in example["puzzle"])
    plain = get_task("sudoku", {"box_rows": 2, "box_cols": 3})
    assert "\n" not in plain.pinned(example).values(), "off by default: the givens only"


# ------------------------------------------------------------------------------------------------ fuzzing
def _near_misses(target: str):
    digits = st.text(alphabet="0123456789", max_size=40)
    return st.one_of(
        st.text(max_size=300),
        st.text(alphabet="0123456789\n |-+,.", max_size=150),
        digits,
        st.builds(lambda i, c: target[:i] + c + target[i + 1:], st.integers(0, len(target)), st.characters()),
        st.builds(lambda i, s: target[:i] + s + target[i:], st.integers(0, len(target)), st.text(max_size=10)),
        st.builds(lambda i: target[:i], st.integers(0, len(target))),
        st.builds(lambda a, b: a + target + b, st.text(max_size=50), st.text(max_size=50)),
        st.builds(lambda s: target.translate(str.maketrans("1234", s)), st.permutations("1234").map("".join)),
    )


@pytest.mark.parametrize("box,count", [((2, 2), 7000), ((3, 3), 3000)])
def test_validator_never_raises(box, count):
    task = get_task("sudoku", {"box_rows": box[0], "box_cols": box[1], "min_blanks": 5, "max_blanks": 9})
    example = task.generate(1, 0)[0]
    target = task.target(example)
    calls = [0]

    @fuzz(count)
    @given(_near_misses(target))
    def check(text):
        verdict = task.validate(example, text)
        calls[0] += 1
        assert isinstance(verdict, Verdict) and isinstance(verdict.reason, str) and "\n" not in verdict.reason
        assert 0.0 <= verdict.score <= 1.0 and (verdict.valid or not verdict.correct)
        json.dumps(verdict.to_dict())

    check()
    assert calls[0] >= count * 0.9


def test_validator_on_huge_and_odd_strings(task, public):
    example = public[0][300]
    target = task.target(example)
    rng = random.Random(0)
    huge = ["1234" * 300_000, "0" * 1_000_000, "x" * 1_000_000, "\n" * 1_000_000, "1\n" * 500_000,
            "1a" * 500_000, "123456789012345x" * 70_000, "1 2 | " * 200_000, "é漢🙂" * 300_000,
            "".join(rng.choice("0123456789 \n|-x") for _ in range(1_000_000)), "x" * 999_000 + target,
            target + "9" * 1_000_000, "\u0663" * 1_000_000]
    for text in huge:
        verdict = task.validate(example, text)
        assert isinstance(verdict, Verdict) and "\n" not in verdict.reason
    assert task.validate(example, target + "9" * 1_000_000).correct
    assert not task.validate(example, "x" * 1_000_000).valid
    nine = get_task("sudoku", {"box_rows": 3, "box_cols": 3, "min_blanks": 40, "max_blanks": 50})
    nine_example = nine.generate(1, 2)[0]
    for text in huge:
        assert isinstance(nine.validate(nine_example, text), Verdict)


@fuzz(1500)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789\nx", min_size=15, max_size=25)),
       st.sampled_from(range(0, 1472, 37)))
def test_violations_never_raise(public_rows, draft, index):
    task, examples = public_rows
    example = examples[index]
    bad = task.violations(example, draft)
    assert isinstance(bad, list) and all(isinstance(o, int) and 0 <= o < len(draft) for o in bad)
    assert bad == sorted(set(bad))


@pytest.fixture(scope="module")
def public_rows(task, public):
    return task, public[0] + public[1]


def test_solver_counts_and_budget():
    grid = Grid.of(3, 3)
    assert grid.count_solutions([0] * 81, limit=2) == 2
    assert grid.count_solutions([0] * 81, limit=2, node_limit=5) is None
    assert grid.solve([1, 1] + [0] * 79) == []
    full = grid.random_full(random.Random(1))
    assert grid.is_solution(full) and grid.count_solutions(full) == 1
