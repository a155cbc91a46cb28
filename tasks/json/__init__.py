"""JSON that follows a schema: given a JSON Schema (and, for generated data, a short text stating the values to put
in), write one JSON instance that validates.

Data: small synthetic schemas drawn from a built-in vocabulary (person, order, device, event, book) with a
matching reference instance and a facts text that states every value (`generate`, `vocabulary`; option
`vocabulary: train | heldout` shows invented names and values from two disjoint halves, `lexicon`); or rows read
from files and Hub datasets with a schema and optionally a reference (`rows`: the shipped json-mode-eval copy;
JSONSchemaBench-style collections of schemas only).

Fields of an example (all JSON-able, so `datasets` keeps one column type across rows):
  schema_json     the schema as compact JSON text (use `schema_of(example)` for the object)
  reference_json  a reference instance as compact JSON text, keys in schema order, or None (evaluation only:
                  the target is then "")
  facts           the values to put in, as text ("" when the source has none)
  prompt_text     the source's own prompt, or None

Judging (`judge`): the answer's JSON is extracted (`extract`: code fences stripped, leading prose skipped, trailing
text ignored), parsed, and checked with `jsonschema` (`schema_checks`: draft from `$schema`, default 2020-12, with
format checking and time-bounded patterns). `valid`: it parses; `correct`: it validates and, when there is a
reference (and `match_reference`), equals it field by field (`leaves`: every leaf at the same JSON pointer,
numbers compared numerically, no extra leaves). `score`: leaves matched over the union of the reference's and the
answer's leaves, or 1/0 for schema validity without a reference. To bound the time per answer (jsonschema costs
~5-50 us a value), at most 100,000 characters are parsed, and an answer with more than 1,000 values or nested
deeper than 64 levels is reported as valid JSON that was not checked. Formats are checked with jsonschema's
`format-nongpl` extra (`formats`: date-time, uri, ...); a format no check covers is named in the verdict. `$ref`s
resolve through jsonschema's `referencing` registry, inside the schema only (`schema_refs`, `key_order`).
"""

from dgemma_ft.tasks.json.extract import extract_json
from dgemma_ft.tasks.json.json_text import dumps_compact, has_reference, reference_of, schema_of
from dgemma_ft.tasks.json.key_order import order_like_schema
from dgemma_ft.tasks.json.options import JsonSchemaOptions
from dgemma_ft.tasks.json.patterns import PATTERN_SECONDS, PatternTimeout, pattern_search
from dgemma_ft.tasks.json.schema_checks import timed_validator_class, validator_class
from dgemma_ft.tasks.json.schema_refs import resolve
from dgemma_ft.tasks.json.task import JsonSchemaTask

__all__ = ["PATTERN_SECONDS", "JsonSchemaOptions", "JsonSchemaTask", "PatternTimeout", "dumps_compact",
           "extract_json", "has_reference", "order_like_schema", "pattern_search", "reference_of", "resolve",
           "schema_of", "timed_validator_class", "validator_class"]
