"""JSON-schema task: the public json-mode-eval references are judged correct and their corruptions rejected, the
answer's JSON is found inside fences and prose, `$ref`s resolve as jsonschema resolves them, generation is seeded
and varied, sources fail row by row with one clear reason, and the validator never raises on any string (its
speed on the same inputs is measured by benchmarks/json_validation.py)."""

import json
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma_ft.errors import DataError, UserError
from dgemma_ft.tasks import SourceSpec, Verdict, get_task
from dgemma_ft.tasks import RowError
from dgemma_ft.tasks.json import order_like_schema, reference_of, resolve, schema_of
from dgemma_ft.tasks.json.formats import STANDARD_FORMATS, format_note, unchecked_formats
from dgemma_ft.tasks.json.schema_checks import validator_class



SCHEMA_FEATURES = {  # what generated schemas must keep showing, by a test on the compact schema text
    "nested object": lambda text: text.count('"type":"object"') > 1,
    "array of scalars": lambda text: '"items":{"type":"string"}' in text or '"items":{"type":"integer"}' in text,
    "array of objects": lambda text: '"items":{"type":"object"' in text,
    "enum": lambda text: '"enum"' in text,
    "date": lambda text: '"format":"date"' in text,
    "email": lambda text: '"format":"email"' in text,
    "minimum": lambda text: '"minimum"' in text,
    "boolean": lambda text: '"type":"boolean"' in text,
    "number": lambda text: '"type":"number"' in text,
    "optional": lambda text: len(json.loads(text)["properties"]) > len(json.loads(text).get("required", [])),
}


def count_schema_features(features: dict, schema_text: str) -> None:
    """Add one to each feature of SCHEMA_FEATURES that the schema shows."""
    for name, shows in SCHEMA_FEATURES.items():
        features[name] = features.get(name, 0) + shows(schema_text)

def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True)


@pytest.fixture(scope="module")
def task():
    return get_task("json")


@pytest.fixture(scope="module")
def public(task):
    return [dict(r) for r in task.build_dataset("eval", SourceSpec(source="json/json_mode_eval.jsonl"))]


@pytest.fixture(scope="module")
def person(task):
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "born": {"type": "string", "format": "date"},
                             "email": {"type": "string", "format": "email"},
                             "address": {"type": "object", "properties": {"zip": {"type": "integer"}},
                                         "required": ["zip"]},
                             "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "address"]}
    reference = {"tags": ["a", "b"], "name": "Ada", "born": "1990-02-03", "email": "ada@mail.com",
                 "address": {"zip": 12345}}
    return task.from_row({"schema": schema, "reference": reference}, {})


def judged(task, example, text, calls: list[Verdict]) -> Verdict:
    verdict = task.validate(example, text)
    calls.append(verdict)
    assert isinstance(verdict, Verdict)
    assert 0.0 <= verdict.score <= 1.0 and "\n" not in verdict.reason
    return verdict


def _wrong_value(types) -> object:
    types = {types} if isinstance(types, str) else set(types)
    for value, kinds in (("wrong", {"string"}), (True, {"boolean"}), ([1], {"array"}), ({"x": 1}, {"object"}),
                         (None, {"null"}), (1.5, {"number"})):
        if not kinds & types:
            return value
    return None


# ------------------------------------------------------------------------------------------- public set
def test_public_references_correct_and_corruptions_rejected(task, public):
    assert len(public) == 100
    dropped = wrong_typed = 0
    for example in public:
        target = task.target(example)
        assert target == example["messages"][1]["content"]
        verdict = task.validate(example, target)
        assert verdict.valid and verdict.correct and verdict.score == 1.0, (verdict, target)

        schema, reference = schema_of(example), reference_of(example)
        objects = list(_objects(schema, reference))
        # a dropped required key (where the schema has one; else any key, caught by the reference)
        spot = next(((path, name) for path, sub, value in objects
                     for name in sub.get("required", []) if name in value), None)
        path, name = spot or ([], next(iter(reference)))
        verdict = task.validate(example, json.dumps(_edit(reference, path, name, None)))
        assert verdict.valid and not verdict.correct and verdict.score < 1
        if spot:
            assert f"'{name}' is a required property" in verdict.reason and not verdict.details["schema_valid"]
            dropped += 1
        # a wrong-typed value (where the schema types one)
        spot = next(((path, name, sub["properties"][name]["type"]) for path, sub, value in objects
                     for name in value if isinstance(sub.get("properties", {}).get(name), dict)
                     and "type" in sub["properties"][name]), None)
        if spot:
            path, name, types = spot
            verdict = task.validate(example, json.dumps(_edit(reference, path, name, _wrong_value(types))))
            assert verdict.valid and not verdict.correct and not verdict.details["schema_valid"]
            pointer = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in [*path, name])
            assert pointer in verdict.details["errors"] and verdict.reason.startswith(pointer), verdict
            wrong_typed += 1
        # truncated JSON
        for cut in (len(target) // 2, len(target) - 1):
            verdict = task.validate(example, target[:cut])
            assert not verdict.valid and not verdict.correct and verdict.score == 0.0
        # a changed leaf: still JSON, no longer the reference
        changed = _change_first_leaf(json.loads(target))
        verdict = task.validate(example, json.dumps(changed))
        assert verdict.valid and not verdict.correct and verdict.score < 1, (verdict, changed)
    assert dropped >= 90 and wrong_typed >= 90, (dropped, wrong_typed)


def _objects(schema, value, path=()):
    """(path, schema, value) for the objects of `value` that `schema` describes through `properties`."""
    schema = resolve(schema, schema) if isinstance(schema, dict) else {}
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        yield list(path), schema, value
        for name, sub in schema["properties"].items():
            if name in value:
                yield from _objects(sub, value[name], (*path, name))


def _edit(value, path, name, new):
    """A copy of `value` with `name` under `path` set to `new` (None: removed)."""
    value = json.loads(json.dumps(value))
    node = value
    for part in path:
        node = node[part]
    if new is None:
        del node[name]
    else:
        node[name] = new
    return value


def _change_first_leaf(value):
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return {**value, key: _change_first_leaf(value[key])}
    if isinstance(value, list) and value:
        return [_change_first_leaf(value[0])] + value[1:]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return "changed"


def test_public_prompt_and_key(task, public):
    example = public[0]
    assert task.prompt(example) == example["prompt_text"]  # the row's own prompt when it has no facts
    assert "<schema>" in task.prompt(example)
    assert task.key(example).startswith("{") and json.loads(task.key(example).split("\n")[0]) == schema_of(example)


def test_match_reference_off_judges_schema_only(public):
    task = get_task("json", {"match_reference": False})
    example = public[0]
    changed = _change_first_leaf(json.loads(task.target(example)))
    verdict = task.validate(example, json.dumps(changed))
    assert verdict.correct and verdict.score == 1.0


# ------------------------------------------------------------------------------------------- extraction
def test_extraction_fences_prose_trailing(task, person):
    target = task.target(person)
    assert target == '{"name":"Ada","born":"1990-02-03","email":"ada@mail.com","address":{"zip":12345},' \
                     '"tags":["a","b"]}'  # keys in schema order, compact
    pretty = json.dumps(json.loads(target), indent=2)
    for text in (f"```json\n{pretty}\n```", f"```\n{target}```", f"Sure! Here it is:\n{target}",
                 f"{target}\nThis JSON has {{braces}} and more text.", f"Note {{see}} below: {target}",
                 f"```json\n{target}", f"  {target}  "):
        verdict = task.validate(person, text)
        assert verdict.correct, (text, verdict)
    numeric = target.replace("12345", "12345.0")
    assert task.validate(person, numeric).correct  # numbers compared numerically
    for text in ("", "no json here", "{", "```json\n```", '{"name": NaN}', "[" * 5000):
        verdict = task.validate(person, text)
        assert not verdict.valid and not verdict.correct and verdict.reason.startswith("not valid JSON")


def test_error_messages_carry_json_pointer(task, person):
    answer = {"name": "Ada", "born": "1990-02-03", "email": "ada@mail.com", "address": {"zip": "abc"},
              "tags": ["a", "b"]}
    verdict = task.validate(person, json.dumps(answer))
    assert verdict.valid and not verdict.correct
    assert verdict.reason == "/address/zip: 'abc' is not of type 'integer'"
    assert verdict.details["errors"] == ["/address/zip"]
    missing = task.validate(person, json.dumps({"name": "Ada"}))
    assert missing.reason == "(root): 'address' is a required property"
    extra = task.validate(person, json.dumps({**answer, "address": {"zip": 12345}, "tags": ["a", "b", "c"]}))
    assert extra.valid and not extra.correct and extra.reason.startswith("/tags/2") and extra.score < 1
    assert extra.details["schema_valid"]


def test_format_checking(task, person):
    good = json.loads(task.target(person))
    for field, bad in (("born", "1990-02-30"), ("born", "03/02/1990"), ("email", "ada.mail.com")):
        verdict = task.validate(person, json.dumps({**good, field: bad}))
        assert verdict.valid and not verdict.correct and not verdict.details["schema_valid"]
        assert verdict.reason.startswith(f"/{field}: ") and "is not a" in verdict.reason


FORMATS = [
    # (format, a value that conforms, one that does not)
    ("date-time", "2024-01-02T03:04:05Z", "2024-01-02 03:04"), ("date", "2024-02-29", "2023-02-29"),
    ("time", "03:04:05+01:00", "03:04:05"), ("uri", "https://example.com/a?b=1", "example.com/a"),
    ("email", "ada@mail.com", "ada.mail.com"), ("ipv4", "10.0.0.1", "10.0.0.256"),
    ("uuid", "123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456"),
    ("hostname", "example.com", "-bad-.com"), ("duration", "P1DT2H", "1 day"),
]


@pytest.mark.parametrize("name,good,bad", FORMATS, ids=[f for f, _, _ in FORMATS])
@pytest.mark.parametrize("dialect", [None, "http://json-schema.org/draft-04/schema#"])
def test_formats_enforced(task, name, good, bad, dialect):
    schema = {"type": "object", "properties": {"v": {"type": "string", "format": name}}}
    if dialect:  # formats a draft does not define (date, uuid, ... in draft-04) are checked the 2020-12 way
        schema["$schema"] = dialect
    example = task.from_row({"schema": schema}, {})
    verdict = task.validate(example, json.dumps({"v": good}))
    assert verdict.correct and verdict.reason == "follows the schema", verdict
    verdict = task.validate(example, json.dumps({"v": bad}))
    assert not verdict.correct and verdict.reason == f"/v: {bad!r} is not a {name!r}"
    with pytest.raises(RowError, match=f"reference does not match the schema: /v: .* is not a '{name}'"):
        task.from_row({"schema": schema, "reference": {"v": bad}}, {})


def test_every_standard_format_has_a_check():
    # jsonschema[format-nongpl] (a dependency) brings the packages behind date-time, uri, hostname, ...
    for dialect in (None, "http://json-schema.org/draft-07/schema#", "http://json-schema.org/draft-04/schema#"):
        schema = {"$schema": dialect} if dialect else {}
        for name in sorted(STANDARD_FORMATS):
            assert unchecked_formats({**schema, "format": name}, validator_class(schema)) == (), (dialect, name)


def test_unchecked_formats_are_named_not_passed_silently(task):
    schema = {"type": "object", "properties": {"price": {"type": "string", "format": "currency"},
                                               "when": {"type": "string", "format": "date-time"}}}
    example = task.from_row({"schema": schema, "reference": {"price": "$5", "when": "2024-01-02T03:04:05Z"}}, {})
    verdict = task.validate(example, task.target(example))
    assert verdict.correct and verdict.details["unchecked_formats"] == ["currency"]
    assert verdict.reason == ("follows the schema and matches the reference; format 'currency' is not checked: "
                              "JSON Schema does not define it")
    assert "unchecked_formats" not in task.validate(task.from_row({"schema": {"format": "date"}}, {}),
                                                    '"2024-01-02"').details
    # a standard format whose package is missing names the extra that checks it
    assert format_note(("date-time", "uri", "x")) == (
        "formats 'date-time', 'uri' are not checked: install jsonschema[format-nongpl]; "
        "format 'x' is not checked: JSON Schema does not define it")


def test_no_reference_rows_judge_schema_only(task):
    example = task.from_row({"json_schema": json.dumps({"type": "array", "items": {"type": "integer"}})}, {})
    assert example["reference_json"] is None and task.target(example) == ""
    assert task.validate(example, "[1, 2, 3]").correct
    verdict = task.validate(example, '[1, "x"]')
    assert verdict.valid and not verdict.correct and verdict.score == 0.0 and verdict.reason.startswith("/1:")


def test_violations(task, person):
    target = task.target(person)
    assert task.violations(person, target) == []
    broken = target.replace(":", "#", 1)
    assert task.violations(person, broken) == [target.index(":")]
    assert task.violations(person, target[:20]) == [19]
    assert task.violations(person, "") == [] and task.violations(person, None) == []


# ------------------------------------------------------------------------------------------- $ref
POINT = {"type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "integer"}}, "required": ["x"]}
REF_SCHEMAS = [
    # (case, schema whose instance is a point {"y", "x"} reached through a $ref)
    ("defs", {"$defs": {"point": POINT}, "$ref": "#/$defs/point"}),
    ("definitions-draft7", {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"point": POINT},
                            "allOf": [{"$ref": "#/definitions/point"}]}),
    ("chain", {"$defs": {"alias": {"$ref": "#/$defs/point"}, "point": POINT}, "$ref": "#/$defs/alias"}),
    ("anchor", {"$defs": {"point": {**POINT, "$anchor": "pt"}}, "$ref": "#pt"}),
    ("id", {"$defs": {"point": {**POINT, "$id": "https://example.com/point.json"}},
            "$ref": "https://example.com/point.json"}),
    ("relative-to-root-id", {"$id": "https://example.com/shapes/root.json",
                             "$defs": {"point": {**POINT, "$id": "point.json"}}, "$ref": "point.json"}),
    # "point.json" is relative to the subschema's own $id (…/inner/), not the root's: only base tracking finds it
    ("relative-to-subschema-id", {"$id": "https://example.com/root.json", "$defs": {
        "wrapper": {"$id": "https://example.com/inner/wrapper.json", "$ref": "point.json"},
        "point": {**POINT, "$id": "https://example.com/inner/point.json"}}, "$ref": "inner/wrapper.json"}),
]


@pytest.mark.parametrize("case,schema", REF_SCHEMAS, ids=[c for c, _ in REF_SCHEMAS])
def test_refs_resolve_as_jsonschema_does(task, case, schema):
    example = task.from_row({"schema": schema, "reference": {"x": 1, "y": 2}}, {})
    assert task.target(example) == '{"y":2,"x":1}'  # key order taken from the schema the ref points to
    assert task.validate(example, '{"x": 1, "y": 2}').correct
    verdict = task.validate(example, '{"y": 2}')  # the ref's `required` is checked
    assert not verdict.correct and verdict.reason == "(root): 'x' is a required property"
    assert task.validate(example, '{"x": "1", "y": 2}').reason.startswith("/x: '1' is not of type 'integer'")


def test_nested_and_recursive_refs_order_keys():
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
    value = {"kids": [{"kids": [], "name": "b"}], "name": "a"}
    assert json.dumps(order_like_schema(value, tree)) == \
        '{"name": "a", "kids": [{"name": "b", "kids": []}]}'
    nested = {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "$defs": {"point": POINT}}
    assert list(order_like_schema({"p": {"x": 1, "y": 2}}, nested)["p"]) == ["y", "x"]
    assert resolve({"$ref": "#/$defs/point"}, nested) == POINT
    # a property with its own $id: its relative ref resolves against that $id, as jsonschema resolves it
    based = {"$id": "https://example.com/root.json", "type": "object",
             "properties": {"p": {"$id": "https://example.com/inner/p.json", "$ref": "point.json"}},
             "$defs": {"point": {**POINT, "$id": "https://example.com/inner/point.json"}}}
    assert list(order_like_schema({"p": {"x": 1, "y": 2}}, based)["p"]) == ["y", "x"]
    task = get_task("json")
    example = task.from_row({"schema": based}, {})
    assert task.validate(example, '{"p": {"y": 2}}').reason == "/p: 'x' is a required property"


def test_self_referential_schemas_end(task):
    loops = [{"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
             {"allOf": [{"$ref": "#"}], "properties": {"a": {}}}]
    for schema in loops:
        assert order_like_schema({"b": 1, "a": 2}, schema) in ({"b": 1, "a": 2}, {"a": 2, "b": 1})
        assert isinstance(resolve(schema), dict)
        example = task.from_row({"schema": schema}, {})
        verdict = task.validate(example, '{"a": 1}')
        assert not verdict.correct and verdict.reason == "the schema recurses too deeply"
        with pytest.raises(RowError, match="^the schema recurses too deeply, so the reference cannot be checked$"):
            task.from_row({"schema": schema, "reference": {"a": 1}}, {})


def test_unresolvable_refs_are_reported_never_fetched(task, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a remote $ref was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    outside = "cannot be resolved (only refs to places inside the schema are followed; nothing is downloaded)"
    for ref, reason in (("https://example.com/elsewhere.json", outside), ("other.json#/x", outside),
                        ("#/$defs/missing", "points to nothing in the schema"),
                        ("#nowhere", "names an anchor the schema does not define")):
        schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
        example = task.from_row({"schema": schema}, {})
        verdict = task.validate(example, '{"a": 1}')
        assert verdict.valid and not verdict.correct
        assert verdict.reason == f"the schema's $ref {ref!r} {reason}"
        assert task.validate(example, '{"b": 1}').correct  # the ref only applies to "a"
        assert order_like_schema({"a": {"z": 1, "y": 2}}, schema) == {"a": {"z": 1, "y": 2}}
        with pytest.raises(RowError, match=r"^the schema's \$ref .* so the reference cannot be checked$"):
            task.from_row({"schema": schema, "reference": {"a": 1}}, {})


# ------------------------------------------------------------------------------------------- generator
def test_generator_seeded_valid_and_varied(task):
    first, again, other = task.generate(500, 7), task.generate(500, 7), task.generate(50, 8)
    assert first == again and first[:50] != other
    features = {"nested object": 0, "array of scalars": 0, "array of objects": 0, "enum": 0, "date": 0,
                "email": 0, "minimum": 0, "boolean": 0, "number": 0, "optional": 0}
    keys = set()
    for example in first:
        target = task.target(example)
        verdict = task.validate(example, target)
        assert verdict.correct and verdict.score == 1.0, (example, verdict)
        assert "unchecked_formats" not in verdict.details  # every generated `format` is checked
        assert len(task.prompt(example)) <= 400
        schema = example["schema_json"]
        for value in json.loads(target).values() if isinstance(json.loads(target), dict) else []:
            if not isinstance(value, (dict, list)):
                assert str(value).lower() in example["facts"].lower()
        count_schema_features(features, schema)
        keys.add(task.key(example))
    assert all(count >= 10 for count in features.values()), features
    assert len(keys) == len(first)
    lengths = [len(task.prompt(e)) for e in first]
    assert sum(lengths) / len(lengths) < 350


def test_generator_options(task):
    flat = get_task("json", {"max_depth": 0, "formats": False, "min_properties": 3, "max_properties": 3,
                             "max_prompt_chars": None})
    for example in flat.generate(100, 1):
        schema = schema_of(example)
        assert len(schema["properties"]) == 3 and '"format"' not in example["schema_json"]
        assert all(p.get("type") not in ("object", "array") for p in schema["properties"].values())
    loose = get_task("json", {"compact_schema": False, "shuffle_facts": True, "max_prompt_chars": None})
    example = loose.generate(1, 3)[0]
    assert '{"type": "object", ' in loose.prompt(example)
    built = task.build_dataset("train", SourceSpec(size=20, seed=3))
    assert len(built) == 20 and built[0]["messages"][1]["content"] == task.target(dict(built[0]))
    with pytest.raises(UserError, match=r"task.options.max_properties: min_properties \(5\) must not exceed"):
        get_task("json", {"min_properties": 5, "max_properties": 2})
    with pytest.raises(UserError, match="task.options.max_depth"):
        get_task("json", {"max_depth": 9})
    with pytest.raises(UserError, match="task.options.colour"):
        get_task("json", {"colour": 1})
    with pytest.raises(UserError, match="task.options.max_prompt_chars"):
        get_task("json", {"min_properties": 8, "max_properties": 8, "max_prompt_chars": 120}).generate(1, 0)


# ------------------------------------------------------------------------------------------- sources
def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_schema_only_collection(task, tmp_path):
    source = _write(tmp_path / "bench.jsonl", [
        {"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}), "unique_id": "x1"},
        {"schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "string", "maxLength": 3}},
    ])
    dataset = task.build_dataset("eval", SourceSpec(source=source))
    assert len(dataset) == 2 and task.last_report.bad == []
    first, second = dict(dataset[0]), dict(dataset[1])
    assert first["messages"][1]["content"] == "" and first["reference_json"] is None
    assert task.prompt(first).startswith("Write JSON that follows this schema.\nSchema: {")
    assert task.validate(first, '{"a": 1}').correct and not task.validate(first, '{"a": "1"}').correct
    assert task.validate(second, '"abc"').correct and not task.validate(second, '"abcd"').correct


def test_bad_rows_counted_and_strict_rejects(task, tmp_path):
    good = {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}, "reference": {"n": 1}}
    source = _write(tmp_path / "mixed.jsonl", [
        good,
        {"schema": {"type": "nope"}},
        "{not json",
        {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}, "reference": '{"n": "one"}'},
        {"schema": "{bad", "reference": "{}"},
        {"reference": {"n": 1}},
        {"schema": json.dumps(good["schema"]), "reference": json.dumps({"n": 2}), "facts": "n is 2"},
    ])
    dataset = task.build_dataset("eval", SourceSpec(source=source))
    assert len(dataset) == 2
    reasons = dict(task.last_report.bad)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "not a valid JSON Schema" in reasons[2]
    assert "not valid JSON" in reasons[3]
    assert reasons[4] == "reference does not match the schema: /n: 'one' is not of type 'integer'"
    assert reasons[5].startswith("schema is not valid JSON")
    assert reasons[6].startswith("no schema column")
    assert dict(dataset[1])["messages"][0]["content"].endswith("\nFacts: n is 2")
    with pytest.raises(DataError, match="row 2: the schema is not a valid JSON Schema"):
        task.build_dataset("eval", SourceSpec(source=source, strict=True))


def test_column_mapping(task, tmp_path):
    source = _write(tmp_path / "mapped.jsonl", [{"s": {"type": "integer"}, "r": 3}])
    dataset = task.build_dataset("eval", SourceSpec(source=source, columns={"schema": "s", "reference": "r"}))
    assert dict(dataset[0])["messages"][1]["content"] == "3"
    with pytest.raises(RowError, match="missing column 'nope' \\(mapped to schema\\)"):
        task.from_row({"s": {}}, {"schema": "nope"})
    with pytest.raises(RowError, match="unknown field 'shema'"):
        task.from_row({"s": {}}, {"shema": "s"})
    with pytest.raises(DataError, match="missing column 'nope'"):
        task.build_dataset("eval", SourceSpec(source="json/json_mode_eval.jsonl", columns={"schema": "nope"}))
    # Hub json-mode-eval layout: chat messages as the prompt, the completion as JSON text
    example = task.from_row({"prompt": [{"role": "system", "content": "Use the schema."},
                                        {"role": "user", "content": "Give n."}],
                             "completion": '{"n": 1}', "schema": '{"type": "object"}'}, {})
    assert example["prompt_text"] == "Use the schema.\nGive n." and task.target(example) == '{"n":1}'


STRING = {"type": "string"}
REFERENCE_TEXTS = [
    # (schema, reference column text, the reference kept): JSON text when it parses and the schema admits it,
    # else the string itself when the schema admits that
    (STRING, "hello", "hello"), (STRING, '"hi"', "hi"), (STRING, '"\\"hi\\""', '"hi"'), (STRING, " hi ", " hi "),
    (STRING, "123", "123"), (STRING, "true", "true"), (STRING, "null", "null"), (STRING, "1e400", "1e400"),
    ({"type": "integer"}, "123", 123), ({"type": ["string", "integer"]}, "123", 123), ({}, "123", 123),
    ({"type": "boolean"}, "true", True), ({"type": "null"}, "null", None), ({}, "hello", "hello"),
    ({"type": "object"}, '{"n": 1}', {"n": 1}), ({"enum": ["a b", 1]}, "a b", "a b"),
]


@pytest.mark.parametrize("schema,text,kept", REFERENCE_TEXTS)
def test_text_references(task, schema, text, kept):
    example = task.from_row({"schema": schema, "reference": text}, {})
    assert reference_of(example) == kept and type(reference_of(example)) is type(kept)
    assert task.validate(example, task.target(example)).correct
    assert json.loads(task.target(example)) == kept


def test_text_references_that_cannot_be_kept(task):
    for schema, text, reason in (
            ({"type": "object"}, "hello", "reference is not valid JSON (Expecting value at char 0), and as a plain "
                                          "string it does not match the schema: (root): 'hello' is not of type "
                                          "'object'"),
            ({}, '{"n": 1', "reference is not valid JSON (Expecting ',' delimiter at char 7)"),  # never a string
            (STRING, '"hi', "reference is not valid JSON (Unterminated string starting at char 0)"),
            (STRING, "[1]", "reference does not match the schema: (root): [1] is not of type 'string'"),
            ({"type": "integer"}, "1.5", "reference does not match the schema: (root): 1.5 is not of type "
                                         "'integer'")):
        with pytest.raises(RowError) as caught:
            task.from_row({"schema": schema, "reference": text}, {})
        assert str(caught.value) == reason


def test_numbers_too_large_for_a_float_are_refused(task):
    schema = {"type": "object", "properties": {"x": {"type": "number", "maximum": 5}}}
    example = task.from_row({"schema": schema}, {})
    for answer in ('{"x": 1e400}', '{"x": -1E400}', '```json\n{"x": 1.0e309}\n```'):
        verdict = task.validate(example, answer)
        assert not verdict.valid and not verdict.correct and verdict.score == 0.0
        assert verdict.reason.startswith("not valid JSON: number ") and "is too large for a float" in verdict.reason
    assert task.validate(example, '{"x": 1e-400}').correct  # underflow is 0.0, a finite number
    assert task.violations(example, '{"x": 1e400}') == []
    with pytest.raises(RowError, match=r"^reference is not valid JSON \(number 1e400 is too large for a float\)$"):
        task.from_row({"schema": schema, "reference": '{"x": 1e400}'}, {})
    for number in ("inf", "-inf", "nan"):  # a source decoded the row already
        with pytest.raises(RowError, match=rf"^reference: /x holds {number}, not a JSON number \(JSON numbers are "
                                           rf"finite; 1e400 is out of range for a float\)$"):
            task.from_row({"schema": schema, "reference": {"x": float(number)}}, {})
    with pytest.raises(RowError, match="schema is not valid JSON \\(number 1e999 is too large"):
        task.from_row({"schema": '{"maximum": 1e999}'}, {})


# ------------------------------------------------------------------------------------------- fuzz
def _deep(kind: str, depth: int) -> str:
    return {"[": "[" * depth, "{": '{"a":' * depth, "closed": "[" * depth + "]" * depth}[kind]


def _check_calls(calls: list[Verdict], least: int) -> None:
    assert len(calls) >= least, len(calls)


def test_fuzz_arbitrary_text(task, public, person):
    calls: list[Verdict] = []

    @fuzz(3000)
    @given(text=st.text(max_size=300))
    def run(text):
        judged(task, person, text, calls)
        judged(task, public[len(text) % 100], text, calls)

    run()
    _check_calls(calls, 6000)


def test_fuzz_near_misses(task, public):
    calls: list[Verdict] = []

    @fuzz(3000)
    @given(index=st.integers(0, 99), edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(
        ["del", "dup", "{", "}", "[", "]", '"', ",", ":", "0", "-", "e", "\\", "null", "\u00e9", "```", "\n"])),
        max_size=6), wrap=st.sampled_from(["", "fence", "prose", "trail"]))
    def run(index, edits, wrap):
        example = public[index]
        text = task.target(example)
        for where, edit in edits:
            at = int(where * len(text))
            if edit == "del":
                text = text[:at] + text[at + 1:]
            elif edit == "dup":
                text = text[:at] + text[at:at + 8] + text[at:]
            else:
                text = text[:at] + edit + text[at:]
        text = {"": text, "fence": f"```json\n{text}\n```", "prose": f"Answer: {text}",
                "trail": f"{text} done."}[wrap]
        judged(task, example, text, calls)
        assert isinstance(task.violations(example, text), list)

    run()
    _check_calls(calls, 3000)


def test_fuzz_deep_and_huge(task, public, person):
    calls: list[Verdict] = []

    @fuzz(1000)
    @given(kind=st.sampled_from(["[", "{", "closed"]), depth=st.integers(1, 200_000),
           junk=st.text(max_size=20), size=st.integers(0, 300_000))
    def run(kind, depth, junk, size):
        judged(task, person, _deep(kind, depth) + junk, calls)
        judged(task, public[depth % 100], '{"a": "' + "x" * size + '"}' + junk, calls)
        judged(task, person, "[" + ",".join(["1"] * (size // 20)) + "]", calls)
        assert isinstance(task.violations(person, _deep(kind, depth)), list)

    run()
    _check_calls(calls, 3000)
