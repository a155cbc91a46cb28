"""The math task: GSM8K answers judged right and corrupted ones wrong, generators that are reproducible and
whose targets check out, countdown expressions parsed safely, validators that never raise on arbitrary input
(their speed is measured by benchmarks/math_validation.py, not here), and loading with its errors."""

import json
import re
import threading
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma_ft.errors import DataError, UserError
from dgemma_ft.tasks import SourceSpec, get_task
from dgemma_ft.tasks import DATA_DIR, RowError, Verdict
from dgemma_ft.tasks.math import check_expression, exact_value, solve_countdown, warm_up

GSM8K = DATA_DIR / "math" / "gsm8k_test.jsonl"


@pytest.fixture(scope="module")
def task():
    return get_task("math")


@pytest.fixture(scope="module")
def countdown():
    return get_task("math", {"family": "countdown"})


@pytest.fixture(scope="module")
def gsm8k(task):
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    return [(row, task.from_row(row, {})) for row in rows]


# ------------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_answers_are_correct_and_corruptions_are_not(task, gsm8k):
    assert len(gsm8k) == 1319
    for row, example in gsm8k:
        final = int(row["final"])
        good = task.validate(example, row["answer"])
        assert good.valid and good.correct and good.score == 1.0, (row["id"], good.reason)
        body = row["answer"].rsplit("####", 1)[0]
        for wrong in (f"{body}#### {final + 1}", f"{body}#### {final - 1}", f"\\boxed{{{final + 1}}}",
                      f"I think it is \\boxed{{{final * 10 + 3}}}.", f"The answer is {final + 1}."):
            verdict = task.validate(example, wrong)
            assert verdict.valid and not verdict.correct and verdict.score == 0.0, (row["id"], wrong)
        for right in (f"\\boxed{{{final}}}", f"The answer is {final}.", f"so the total is ${final:,}.",
                      f"#### {final:,}", f"\\boxed{{\\frac{{{2 * final}}}{{2}}}}", f"#### {final}.00"):
            verdict = task.validate(example, right)
            assert verdict.correct, (row["id"], right, verdict.reason)


def test_extraction_order_and_forms(task):
    example = {"kind": "word", "final": "18"}
    cases = {
        "#### 18": True, "#### 18 apples": True, "#### $18": True, "\\boxed{18}": True, "\\boxed{\\$18}": True,
        "\\boxed{\\text{18}}": True, "\\boxed{3 \\cdot 6}": True, "\\boxed{\\sqrt{324}}": True,
        "\\boxed{\\left(18\\right)}": True, "x = 18": True, "18%": True, "#### 18\nthen 20": True,
        "#### 17 \\boxed{18}": False,    # '####' is read first
        "\\boxed{17} so 18": False,      # then \boxed
        "12, 15, 18": True,              # then the last number
        "#### 1,800": False, "#### -18": False, "#### 18.5": False, "\\boxed{\\sqrt{2}}": False,
    }
    for text, correct in cases.items():
        verdict = task.validate(example, text)
        assert verdict.valid and verdict.correct == correct, (text, verdict.reason)
    for text in ("", "no number here", "#### ", "\\boxed{}", "#### banana"):
        verdict = task.validate(example, text)
        assert not verdict.valid and not verdict.correct and verdict.score == 0.0, text
    # the reference may be given by `answer` alone, or be a fraction
    assert task.validate({"kind": "word", "answer": "2 + 3 = 5\n#### 5"}, "\\boxed{5}").correct
    assert task.validate({"kind": "word", "final": "0.5"}, "\\boxed{\\frac{1}{2}}").correct
    assert task.validate({"kind": "word", "final": "0.5"}, "#### 1/2").correct
    assert not task.validate({"kind": "word"}, "#### 5").valid


def test_exact_value_of_small_latex():
    assert exact_value("\\frac{36}{2}") == 18 and exact_value("\\dfrac{3}{4}") == Fraction(3, 4)
    assert exact_value("2\\sqrt{81}") == 18 and exact_value("-(3+4)\\times 2") == -14
    assert exact_value("\\frac12") == Fraction(1, 2)
    for text in ("\\frac{1}{0}", "18/0", "((7", "18\\times", "2^{10}", "\\sqrt{", "9!"):
        assert exact_value(text) is None, text
    assert not isinstance(exact_value("\\sqrt{2}"), Fraction)


def test_math_verify_decides_irrational_references_from_any_thread(task):
    warm_up()
    example = {"kind": "word", "final": "\\sqrt{2}"}
    results: list[Verdict] = []
    texts = ["\\boxed{\\sqrt{2}}", "\\boxed{\\frac{2}{\\sqrt{2}}}", "#### 1.4", "\\boxed{2^{999999999}}"]
    worker = threading.Thread(target=lambda: results.extend(task.validate(example, t) for t in texts))
    worker.start()
    worker.join(timeout=60)
    assert [v.correct for v in results] == [True, True, False, False]
    assert results[0].details["compare"] == "math-verify"


# ----------------------------------------------------------------------------------------------- generators
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def check_worked_solution(answer: str, min_steps: int, max_steps: int) -> None:
    *lines, last = answer.split("\n")
    assert last.startswith("#### ")
    assert min_steps <= len(lines) <= max_steps, answer
    previous = None
    for line in lines:
        found = EQUATION.findall(line)
        assert len(found) == 1, line
        a, op, b, c = found[0]
        a, b, c = int(a), int(b), int(c)
        exact = {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]
        assert exact == c and c >= 0, line
        if previous is not None:
            assert a == previous, answer  # each step works on the last result
        previous = c
    assert int(last[5:]) == previous


@pytest.mark.parametrize("options", [{}, {"min_steps": 2, "max_steps": 5, "max_operand": 50},
                                     {"min_steps": 1, "max_steps": 1, "max_operand": 2}])
def test_arithmetic_generator(options):
    task = get_task("math", options)
    examples = task.generate(500, seed=7)
    assert examples == task.generate(500, seed=7)
    assert examples != task.generate(500, seed=8)
    json.dumps(examples)
    lo, hi = task.options.min_steps, task.options.max_steps
    for example in examples:
        assert example["kind"] == "word" and example["final"] == example["answer"].rsplit("#### ", 1)[1]
        check_worked_solution(example["answer"], lo, hi)
        assert task.validate(example, task.target(example)).correct
        assert task.prompt(example).startswith(example["question"]) and "####" in task.prompt(example)
    assert len({task.key(e) for e in examples}) > 300 or hi == 1


def test_equation_solutions_and_compact_prompt_keep_the_problems():
    """`solution_style: equations` writes each worked step as its bare equation (same problems, same seed, a
    third of the target); `prompt_style: compact` drops the instruction line from word prompts."""
    sentences = get_task("math", {"min_steps": 1, "max_steps": 2})
    short = get_task("math", {"min_steps": 1, "max_steps": 2, "solution_style": "equations",
                              "prompt_style": "compact"})
    long_rows, short_rows = sentences.generate(200, seed=3), short.generate(200, seed=3)
    for long_row, row in zip(long_rows, short_rows):
        assert row["question"] == long_row["question"] and row["final"] == long_row["final"]
        *lines, _ = row["answer"].split("\n")
        assert all(EQUATION.fullmatch(line) for line in lines), row["answer"]
        assert [EQUATION.findall(line) for line in lines] == [EQUATION.findall(line)
                                                               for line in long_row["answer"].split("\n")[:-1]]
        check_worked_solution(row["answer"], 1, 2)
        assert short.prompt(row) == row["question"] and "####" not in short.prompt(row)
        assert short.validate(row, short.target(row)).correct
    assert sum(map(len, (r["answer"] for r in short_rows))) < 0.6 * sum(map(len, (r["answer"] for r in long_rows)))
    assert short.key(short_rows[0]) == sentences.key(long_rows[0])  # the held-out exclusion sees the same problem


def test_worked_solution_off_gives_the_final_line_only():
    task = get_task("math", {"worked_solution": False})
    example = task.generate(1, seed=0)[0]
    assert task.target(example) == f"#### {example['final']}"
    assert task.validate(example, task.target(example)).correct


@pytest.mark.parametrize("options", [{}, {"min_numbers": 2, "max_numbers": 6, "max_operand": 12, "max_target": 500},
                                     {"min_numbers": 2, "max_numbers": 2, "max_operand": 2, "max_target": 1}])
def test_countdown_generator(options):
    task = get_task("math", {"family": "countdown", **options})
    o = task.options
    examples = task.generate(500, seed=3)
    assert examples == task.generate(500, seed=3)
    json.dumps(examples)
    for example in examples:
        assert example["kind"] == "countdown"
        assert o.min_numbers <= len(example["numbers"]) <= o.max_numbers
        assert all(1 <= n <= o.max_operand for n in example["numbers"])
        assert 1 <= example["target_value"] <= o.max_target
        target = task.target(example)
        assert set(target) <= set("0123456789+-*/()")
        assert check_expression(target, example["numbers"]) == example["target_value"]
        verdict = task.validate(example, target)
        assert verdict.valid and verdict.correct and verdict.score == 1.0, (example, verdict.reason)
        assert task.violations(example, target) == []
        used = Counter(int(n) for n in re.findall(r"\d+", target))
        assert used == Counter(example["numbers"]), example  # the reference keeps the rule: every number once
    assert "exactly once" in task.prompt(examples[0])


def test_countdown_generator_at_most_once_may_leave_numbers_out():
    task = get_task("math", {"family": "countdown", "number_use": "at_most_once", "max_numbers": 5})
    examples = task.generate(300, seed=3)
    for example in examples:
        assert task.validate(example, task.target(example)).correct
        assert check_expression(example["final"], example["numbers"], exactly_once=False) == example["target_value"]
    left_out = [e for e in examples if len(re.findall(r"\d+", e["final"])) < len(e["numbers"])]
    assert left_out and "at most once" in task.prompt(examples[0])


def test_countdown_judging(countdown):
    example = {"kind": "countdown", "numbers": [3, 4, 6], "target_value": 30}
    for text in ("(4+6)*3", "3*(6+4)", "(4+6)*3 = 30", "Answer: (4+6)*3", "`(4 + 6) \u00d7 3`", "(6+4)*3.",
                 "Let me think.\n6+4 = 10, times 3\n(6+4)*3"):
        verdict = countdown.validate(example, text)
        assert verdict.correct and verdict.score == 1.0, (text, verdict.reason)
    wrong_value = countdown.validate(example, "(6-4)*3")
    assert wrong_value.valid and not wrong_value.correct and wrong_value.score == 0.5
    rejected = {
        "4*6+6": "6 2 times", "3*3+4*6-3": "3 3 times", "7*4+2": "not one of the numbers",
        "__import__('os')": "character", "(3).real": "character", "().__class__": "character",
        "abs(3)+27": "character", "3**4": "Pow", "6//3": "FloorDiv", "+3": "UAdd", "[3]": "character",
        "9" * 10000: "longer", "(" * 10000 + "3" + ")" * 10000: "longer", "3" + "+3" * 5000: "longer",
        "((((((((((": "well-formed", "": "no expression", "3 4 6": "well-formed",
    }
    for text, reason in rejected.items():
        verdict = countdown.validate(example, text)
        assert not verdict.valid and not verdict.correct and verdict.score == 0.0, text[:40]
        assert reason in verdict.reason, (text[:40], verdict.reason)
    zero = countdown.validate({"kind": "countdown", "numbers": [3, 4, 4], "target_value": 3}, "3/(4-4)")
    assert not zero.valid and "divides by zero" in zero.reason
    assert countdown.violations(example, "(4+x)*3!") == [3, 7]


def test_countdown_solver_and_rows(countdown):
    assert check_expression(solve_countdown([3, 4, 6], 30), [3, 4, 6]) == 30
    assert check_expression(solve_countdown([2, 3, 7, 9], 24), [2, 3, 7, 9]) == 24
    assert solve_countdown([1, 1], 7) is None
    # every number exactly once: 43 alone is no solution of [90, 43, 90] -> 43; at most once, it is
    assert check_expression(solve_countdown([90, 43, 90], 43), [90, 43, 90]) == 43
    assert solve_countdown([90, 43, 90], 43, exactly_once=False) == "43"
    assert solve_countdown([5, 7, 100], 12) is None and solve_countdown([5, 7, 100], 12, exactly_once=False)
    example = countdown.from_row({"nums": [25, 5, 3], "target": 8}, {})
    assert check_expression(example["final"], [25, 5, 3]) == 8 and example["kind"] == "countdown"
    with pytest.raises(RowError, match="does not make"):
        countdown.from_row({"numbers": "3 4 6", "target": 30, "final": "3+4+6"}, {})
    with pytest.raises(RowError, match="no expression"):
        countdown.from_row({"numbers": [1, 1], "target": 7}, {})
    # rows saved from generation load back unchanged
    generated = countdown.generate(20, seed=1)
    assert [countdown.from_row(e, {}) for e in generated] == generated
    words = get_task("math").generate(20, seed=1)
    assert [countdown.from_row(e, {}) for e in words] == words


def test_countdown_uses_every_number_exactly_once_unless_told_otherwise(countdown):
    example = {"kind": "countdown", "numbers": [90, 43, 90], "target_value": 43}
    alone = countdown.validate(example, "43")
    assert not alone.valid and alone.score == 0.0 and "leaves out 90, 90" in alone.reason
    assert countdown.validate(example, "90-90+43").correct and countdown.validate(example, "90/90*43").correct
    partial = countdown.validate({"kind": "countdown", "numbers": [3, 4, 6, 2], "target_value": 30}, "(4+6)*3")
    assert not partial.valid and "leaves out 2" in partial.reason
    loose = get_task("math", {"family": "countdown", "number_use": "at_most_once"})
    assert loose.validate(example, "43").correct and loose.validate(example, "90-90+43").correct
    assert "6 2 times" in loose.validate({"kind": "countdown", "numbers": [3, 4, 6], "target_value": 30},
                                         "4*6+6").reason
    assert "exactly once" in countdown.prompt(example) and "at most once" in loose.prompt(example)
    with pytest.raises(UserError, match="number_use"):
        get_task("math", {"number_use": "twice"})


def test_countdown_step_traces(countdown):
    example = {"kind": "countdown", "numbers": [44, 15, 79], "target_value": 50}
    for text in ("44-15=29,79-29=50", "44-15=29\n79-29=50", "44 - 15 = 29; 79 - 29 = 50", "Steps:\n44-15=29\n79-29=50",
                 "Answer: 44-15=29, 79-29=50.", "79-(44-15)", "79-(44-15) = 50", "15-44=-29,79+-29=50"):
        verdict = countdown.validate(example, text)
        assert verdict.correct and verdict.score == 1.0, (text, verdict.reason)
    trace = countdown.validate(example, "44-15=29,79-29=50")
    assert trace.details["trace"] == "44-15=29,79-29=50" and trace.details["value"] == "50"
    rejected = {
        "44-15=29,79-29=51": "step 2 (79-29=51): 79-29 is 50, not 51",      # a wrong result
        "44-15=30,79-30=49": "step 1 (44-15=30): 44-15 is 29, not 30",      # a wrong intermediate result
        "44-15=29,79-15=64": "step 2 (79-15=64): 15 is already used",       # a number used twice
        "44-15=29,29-15=14": "15 is already used",
        "79-29=50": "29 is not one of the numbers nor an earlier result",    # a result before it is made
        "44-15=29,79-15=64,29+64=93": "15 is already used",
        "44-15=29": "leaves 79 unused",                                      # not every number
        "44-15=29,79+1=80": "1 is not one of the numbers",
    }
    for text, reason in rejected.items():
        verdict = countdown.validate(example, text)
        assert not verdict.valid and verdict.score == 0.0 and reason in verdict.reason, (text, verdict.reason)
    zero = countdown.validate({"kind": "countdown", "numbers": [4, 4, 3], "target_value": 3}, "4-4=0,3/0=0")
    assert not zero.valid and "step 2 (3/0=0): divides by zero" in zero.reason
    halves = {"kind": "countdown", "numbers": [7, 2, 2], "target_value": 3}
    assert "7/2 is 7/2, not 3" in countdown.validate(halves, "7/2=3,3-2=1").reason
    assert countdown.validate(halves, "7-2=5,5-2=3").correct
    # the first step hits the target, but the trace goes on: its last result is the answer
    hits_first = {"kind": "countdown", "numbers": [44, 15, 79], "target_value": 29}
    assert "79-29 is 50" in countdown.validate(hits_first, "44-15=29,79-29=51").reason
    missed = countdown.validate(hits_first, "44-15=29,79-29=50")
    assert missed.valid and not missed.correct and missed.score == 0.5 and "reaches 50, not 29" in missed.reason
    # with four numbers, results of earlier steps combine; a result left unused breaks exactly-once
    four = {"kind": "countdown", "numbers": [2, 3, 4, 5], "target_value": 45}
    assert countdown.validate(four, "2+3=5,4+5=9,5*9=45").correct
    dangling = countdown.validate({**four, "target_value": 20}, "2+3=5,4*5=20")
    assert not dangling.valid and "leaves 5 unused" in dangling.reason
    loose = get_task("math", {"family": "countdown", "number_use": "at_most_once"})
    assert loose.validate({**four, "target_value": 20}, "2+3=5,4*5=20").correct
    assert loose.validate(hits_first, "44-15=29").correct
    assert not loose.validate(hits_first, "44-15=29,79-29=50").correct


def test_countdown_rows_keep_the_rule(countdown):
    trace = countdown.from_row({"numbers": [44, 15, 79], "target": 50, "final": "44-15=29, 79-29=50"}, {})
    assert trace["final"] == "44-15=29,79-29=50"
    assert countdown.target(trace) == "44-15=29,79-29=50" and "steps" in countdown.prompt(trace)
    assert countdown.violations(trace, "44-15=29,79-29=50") == [] and countdown.violations(trace, "44x") == [2]
    assert countdown.validate(trace, countdown.target(trace)).correct
    with pytest.raises(RowError, match="leaves out 90, 90"):
        countdown.from_row({"numbers": [90, 43, 90], "target": 43, "final": "43"}, {})
    with pytest.raises(RowError, match="79-29 is 50, not 51"):
        countdown.from_row({"numbers": [44, 15, 79], "target": 51, "final": "44-15=29,79-29=51"}, {})
    solved = countdown.from_row({"numbers": [90, 43, 90], "target": 43}, {})
    assert check_expression(solved["final"], [90, 43, 90]) == 43
    with pytest.raises(RowError, match="exactly once"):
        countdown.from_row({"numbers": [5, 7, 100], "target": 12}, {})
    loose = get_task("math", {"family": "countdown", "number_use": "at_most_once"})
    assert loose.from_row({"numbers": [90, 43, 90], "target": 43, "final": "43"}, {})["final"] == "43"
    with pytest.raises(RowError, match=r"missing column 'n' \(mapped to numbers\)"):
        countdown.from_row({"numbers": [1, 2], "target": 3}, {"numbers": "n"})


# -------------------------------------------------------------------------------------------------- fuzzing
WORD_TOKENS = ["####", "#### ", "\\boxed{", "\\fbox{", "}", "{", "\\frac{", "\\sqrt{", "\\text{", "\\left(",
               "\\right)", "\\cdot", "\\times", "\\div", "^", "!", "e", "1e999999", "(", ")", "-", "+", "*", "/",
               ".", ",", "%", "$", "\\$", "\n", " ", "The answer is ", "18", "19", "0", "1,000", "2.5",
               "9" * 5000, "(" * 1000, "{" * 1000, "\\boxed{" * 300, "#" * 1000, "1" * 61]
COUNTDOWN_TOKENS = ["3", "4", "6", "10", "30", "0", "+", "-", "*", "/", "(", ")", "**", "//", " ", "\n", "=", ",", ";",
                    "4+6=10", "10*3=30", "3-3=0", "6/0=0", "-" + "9" * 300,
                    "__import__('os')", "(3).real", "abs(", "lambda", "1_0", ".5", "\u00d7", "\u00f7", ":",
                    "9" * 5000, "(" * 300, "-" * 300, "3" + "*3" * 200]
near_miss_word = st.lists(st.sampled_from(WORD_TOKENS) | st.text(max_size=3), max_size=30).map("".join)
near_miss_countdown = st.lists(st.sampled_from(COUNTDOWN_TOKENS) | st.text(max_size=2), max_size=30).map("".join)
FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
WORD_EXAMPLE = {"kind": "word", "question": "q", "answer": "#### 18", "final": "18"}
COUNTDOWN_EXAMPLE = {"kind": "countdown", "question": "q", "numbers": [3, 4, 6], "target_value": 30,
                     "final": "(4+6)*3"}


@pytest.mark.parametrize(("example", "strategy"), [
    (WORD_EXAMPLE, st.text()), (WORD_EXAMPLE, near_miss_word),
    (COUNTDOWN_EXAMPLE, st.text()), (COUNTDOWN_EXAMPLE, near_miss_countdown),
], ids=["word-any", "word-near", "countdown-any", "countdown-near"])
def test_validators_never_raise(task, example, strategy):
    checked: list[str] = []

    @FUZZ
    @given(strategy)
    def check(text):
        verdict = task.validate(example, text)
        checked.append(text)
        assert isinstance(verdict, Verdict) and isinstance(verdict.reason, str) and "\n" not in verdict.reason
        assert 0.0 <= verdict.score <= 1.0 and (verdict.valid or not verdict.correct)

    check()
    assert len(checked) >= 2500


def test_adversarial_inputs_get_a_verdict(task):
    texts = ["9" * 10000, "(" * 100000, "#### " + "9" * 10000, "\\boxed{" * 20000, "#### " * 20000,
             "\\boxed{" + "9" * 10000 + "}", "1e" + "9" * 1000, "\\boxed{9^{9^{9^{9}}}}", "\\boxed{99999!}",
             "-" * 100000 + "3", "\x00" * 10000, "\ud800", "#### 1/0", "#### 0/0", "\\boxed{\\frac{1}{0}}",
             "," * 10000 + "1", "1,000," * 5000, "1." * 20000, "\\sqrt{" * 5000 + "2" + "}" * 5000]
    for example in (WORD_EXAMPLE, COUNTDOWN_EXAMPLE):
        for text in texts:
            verdict = task.validate(example, text)
            assert isinstance(verdict, Verdict) and 0.0 <= verdict.score <= 1.0, text[:30]
    assert not task.validate(WORD_EXAMPLE, None).correct  # not even a string: a verdict, no exception


# ------------------------------------------------------------------------------------------------- loading
def test_shipped_gsm8k_builds(task):
    dataset = task.build_dataset("test", SourceSpec(source="math/gsm8k_test.jsonl"))
    assert len(dataset) == 1319 and task.last_report.used == 1319 and not task.last_report.bad
    first = dataset[0]
    assert first["final"] == "18" and first["messages"][1]["content"].endswith("#### 18")
    assert first["messages"][0]["content"].startswith("Janet")
    short = get_task("math", {"worked_solution": False}).build_dataset("test", {"source": "math/gsm8k_test.jsonl",
                                                                                "size": 5})
    assert len(short) == 5 and short[0]["messages"][1]["content"] == "#### 18"


def test_bad_rows_are_reported_or_rejected(task, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"},
            {"text": "no question column", "answer": "#### 3"},
            {"question": "no final", "answer": "it is four"},
            {"question": "commas", "answer": "#### 1,234"},
            {"question": "boxed only", "solution": "so \\boxed{7}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    dataset = task.build_dataset("train", SourceSpec(source=str(path)))
    assert len(dataset) == 3 and dataset["final"] == ["2", "1234", "7"]
    bad = dict(task.last_report.bad)
    assert sorted(bad) == [2, 3, 6]
    assert "missing column 'question'" in bad[2] and "no final number" in bad[3] and "not valid JSON" in bad[6]
    assert "3 unusable row(s)" in task.last_report.summary()
    with pytest.raises(DataError, match="row 2: missing column 'question'"):
        task.build_dataset("train", SourceSpec(source=str(path), strict=True))
    path.write_text(json.dumps({"question": "x", "answer": "no number at all"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1: no final number"):
        task.build_dataset("train", SourceSpec(source=str(path), strict=True))
    path.write_text(json.dumps({"q": "what?", "a": "#### 3"}) + "\n", encoding="utf-8")
    mapped = task.build_dataset("train", SourceSpec(source=str(path), columns={"question": "q", "answer": "a"}))
    assert mapped[0]["question"] == "what?" and mapped[0]["final"] == "3"
    with pytest.raises(DataError, match="missing column 'qq'"):
        task.build_dataset("train", SourceSpec(source=str(path), columns={"question": "qq"}, strict=True))


def test_generated_datasets_and_exclusion(task, countdown):
    train = task.build_dataset("train", {"size": 300, "seed": 1})
    assert len(train) == 300 and len(set(train["question"])) == 300
    keys = {task.key(e) for e in task.generate(50, seed=1)}
    again = task.build_dataset("train", {"size": 300, "seed": 1}, exclude_keys=keys)
    assert len(again) == 300 and not keys & set(again["question"]) and task.last_report.excluded > 0
    puzzles = countdown.build_dataset("eval", {"size": 200})
    assert len(puzzles) == 200 and set(puzzles["kind"]) == {"countdown"}
    assert task.default_size("train") == 20000 and task.default_size("test") == 500


@pytest.mark.parametrize(("options", "field"), [
    ({"min_steps": 3, "max_steps": 1}, "min_steps"), ({"max_operand": 1}, "max_operand"),
    ({"family": "algebra"}, "family"), ({"min_numbers": 5, "max_numbers": 3}, "min_numbers"),
    ({"max_numbers": 9}, "max_numbers"), ({"max_target": 0}, "max_target"), ({"colour": 1}, "colour"),
    ({"worked_solution": "maybe"}, "worked_solution"),
])
def test_option_errors_name_the_field(options, field):
    with pytest.raises(UserError) as caught:
        get_task("math", options)
    message = str(caught.value)
    assert field in message and "\n" not in message and message.startswith("task 'math': task.options")


def test_reasons_stay_one_line_for_answers_with_line_breaks(task):
    """Found by hypothesis on a fresh clone: a boxed answer holding a line break broke the one-line reason."""
    verdict = task.validate(WORD_EXAMPLE, "\\boxed{####\n1e999999}")
    assert "\n" not in verdict.reason and not verdict.correct
    for text in ("1 +\n2 = 3", "#### 4\n5", "(\n90 - 43)\n= 47"):
        assert "\n" not in task.validate(COUNTDOWN_EXAMPLE, text).reason
        assert "\n" not in task.validate(WORD_EXAMPLE, text).reason


def test_countdown_compact_prompt_states_numbers_and_target_only():
    task = get_task("math", {"family": "countdown", "prompt_style": "compact", "min_numbers": 3, "max_numbers": 3})
    example = task.generate(1, 0)[0]
    numbers = " ".join(str(n) for n in example["numbers"])
    assert task.prompt(example) == f"{numbers} -> {example['target_value']}"
    assert task.validate(example, task.target(example)).correct
    trace = {**example, "final": "44-15=29,79-29=50"}
    assert task.prompt(trace).endswith(" (steps)")
    assert get_task("math", {"family": "countdown"}).prompt(example).startswith("Use the numbers")
