"""The json generator's `vocabulary` option: `train` and `heldout` examples never share a property name or a
string value (every invented word lies in its own half), keep the builtin vocabulary's structure (nested objects,
arrays, enums, bounds, formats, optional properties), validate, fit the prompt budget and are seeded; `builtin`
generates exactly what it did before the option existed."""

import hashlib
import json
import re

import pytest

from dgemma_ft.errors import UserError
from dgemma_ft.tasks import get_task
from dgemma_ft.tasks.json import schema_of
from dgemma_ft.tasks.json.lexicon import BUILTIN_WORDS, TLDS, is_heldout
from test_task_json import count_schema_features

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SMALL = {"max_depth": 1, "min_properties": 2, "max_properties": 3}


def _names_and_values(schema, value, names: set, values: set) -> None:
    """Property names of `schema` (recursively), its enum options, and the string leaves of `value` (dates are
    not held out, so they are left out)."""
    if "enum" in schema:
        values.update(schema["enum"])
    for name, sub in schema.get("properties", {}).items():
        names.add(name)
        _names_and_values(sub, value.get(name) if isinstance(value, dict) else None, names, values)
    if "items" in schema:
        for item in value if isinstance(value, list) else [None]:
            _names_and_values(schema["items"], item, names, values)
    if isinstance(value, str) and not DATE.match(value):
        values.add(value)


def _words(text: str) -> list[str]:
    """The invented words (and code prefixes) in a name or value: letter runs, lowercase, without email TLDs."""
    parts = re.findall(r"[A-Za-z]+", text)
    if "@" in text:
        parts = parts[:-1]  # the top-level domain (com, io, ...) is format, not vocabulary
        assert text.rsplit(".", 1)[1] in TLDS
    return [p.lower() for p in parts]


def _vocabulary(task, examples):
    names, values = set(), set()
    for example in examples:
        verdict = task.validate(example, task.target(example))
        assert verdict.correct and verdict.score == 1.0, (example, verdict)
        assert "unchecked_formats" not in verdict.details
        _names_and_values(schema_of(example), json.loads(example["reference_json"]), names, values)
    return names, values


@pytest.fixture(scope="module")
def halves():
    out = {}
    for half in ("train", "heldout"):
        task = get_task("json", {"vocabulary": half})
        out[half] = (task, task.generate(2000, 11 if half == "train" else 12))
    return out


def test_train_and_heldout_share_no_name_and_no_value(halves):
    found = {half: _vocabulary(task, examples) for half, (task, examples) in halves.items()}
    (train_names, train_values), (held_names, held_values) = found["train"], found["heldout"]
    assert len(train_names) > 1000 and len(held_names) > 1000 and len(train_values) > 2000
    assert not train_names & held_names
    assert not train_values & held_values
    assert not (train_names | train_values) & (held_names | held_values)
    for half, heldout in (("train", False), ("heldout", True)):
        names, values = found[half]
        for text in names | values:
            for word in _words(text):
                assert is_heldout(word) == heldout and word not in BUILTIN_WORDS, (half, text, word)
        assert all(re.fullmatch(r"[a-z]+(_[a-z]+)?", name) for name in names)
        assert any("_" in name for name in names)
    # and nothing from the builtin vocabulary appears
    builtin = get_task("json")
    builtin_names, builtin_values = _vocabulary(builtin, builtin.generate(500, 3))
    for half in found.values():
        assert not builtin_names & half[0] and not builtin_values & half[1]


def test_invented_examples_keep_the_structure(halves):
    task, examples = halves["heldout"]
    features = {"nested object": 0, "array of scalars": 0, "array of objects": 0, "enum": 0, "date": 0,
                "email": 0, "minimum": 0, "boolean": 0, "number": 0, "integer": 0, "optional": 0, "person": 0,
                "code": 0, "two-word name": 0}
    for example in examples[:500]:
        text = example["schema_json"]
        assert len(task.prompt(example)) <= 400
        count_schema_features(features, text)
        features["integer"] += '"type":"integer"' in text
        features["person"] += re.search(r" is [A-Z][a-z]+ [A-Z][a-z]+(;|$)", example["facts"]) is not None
        features["code"] += re.search(r" is [A-Z]{1,3}\d{3,4}(;|$)", example["facts"]) is not None
        features["two-word name"] += re.search(r'"[a-z]+_[a-z]+":', text) is not None
        # facts keep their format: "path is value", with the invented names in the path
        for fact in example["facts"].split("; "):
            assert re.match(r"^[a-z_]+(\[\d\])?(\.[a-z_]+)?(\[\d\])?(\.[a-z_]+)? (is|are) ", fact), fact
    assert all(count >= 10 for count in features.values()), features
    # enum options: 2-4 distinct invented words
    for example in examples:
        for enum in re.findall(r'"enum":(\[[^\]]*\])', example["schema_json"]):
            options = json.loads(enum)
            assert 2 <= len(options) <= 4 and len(set(options)) == len(options)


def test_invented_examples_seeded_and_fit_the_prompt_budget():
    for options in ({}, SMALL):
        for half in ("train", "heldout"):
            task = get_task("json", {**options, "vocabulary": half})
            first = task.generate(300, 5)
            assert first == task.generate(300, 5) and first[:20] != task.generate(20, 6)
            lengths = [len(task.prompt(e)) for e in first]
            assert max(lengths) <= 400 and sum(lengths) / len(lengths) < 350
            assert len({task.key(e) for e in first}) == len(first)
            for example in first:
                assert task.validate(example, task.target(example)).correct
    flat = get_task("json", {"vocabulary": "heldout", "max_depth": 0, "min_properties": 3, "max_properties": 3})
    for example in flat.generate(200, 2):
        schema = schema_of(example)
        assert len(schema["properties"]) == 3
        assert all(p.get("type") not in ("object", "array") for p in schema["properties"].values())


def test_builtin_vocabulary_unchanged():
    expected = {
        "schema_json": '{"type":"object","properties":{"id":{"type":"string"},"order_date":{"type":"string",'
                       '"format":"date"},"priority":{"enum":["low","medium","high"]},"paid":{"type":"boolean"}},'
                       '"required":["order_date","priority"]}',
        "reference_json": '{"id":"ID5069","order_date":"1999-10-19","priority":"medium"}',
        "facts": "id is ID5069; order_date is 1999-10-19; priority is medium", "prompt_text": None}
    assert get_task("json").generate(1, 0)[0] == expected
    assert get_task("json", {"vocabulary": "builtin"}).generate(1, 0)[0] == expected
    # many examples, two option sets: the same as before the option existed (sha256 of the JSON dump)
    for options, seed, digest in (({}, 0, "3263afa7c4beb057ba62e03dc30dd94472a4e0b76dc9c9e11d5d4c6f6b23558d"),
                                  (SMALL, 5, "f5fa1aad021fdcdc91cbdef04e38dea3104e781c34bace6e0c69c2ec5cea3005")):
        examples = get_task("json", options).generate(300, seed)
        assert hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest() == digest


def test_vocabulary_option_errors():
    for bad, shown in (("test", "(got 'test')"), (1, "(got 1)"), ("test_set", "(got 'test_set')")):
        with pytest.raises(UserError) as caught:
            get_task("json", {"vocabulary": bad})
        message = str(caught.value)
        assert "\n" not in message
        assert message == ("task 'json': task.options.vocabulary: Input should be 'builtin', 'train' or "
                           f"'heldout' {shown}")
