"""Targets list object keys in the order of the schema's `properties` (across `$ref`, `allOf`/`anyOf`/`oneOf`,
`then`/`else`), so a model learns one order for one schema."""

from __future__ import annotations

from typing import Any

from dgemma_ft.tasks.json.schema_refs import Scope, subschemas

MAX_NESTING = 100  # deeper values keep their own key order


def order_like_schema(value: Any, schema: Any) -> Any:
    """A copy of `value` whose object keys follow the order of the schema's `properties` (others keep their
    order, after them)."""
    return _ordered(value, schema, Scope.of_root(schema), 0)


def _ordered(value: Any, schema: Any, scope: Scope, depth: int) -> Any:
    if depth > MAX_NESTING or not isinstance(value, (dict, list)):
        return value
    parts = subschemas(schema, scope)
    if isinstance(value, dict):
        order: dict[str, tuple[Any, Scope]] = {}
        for part, inner in parts:
            properties = part.get("properties")
            if isinstance(properties, dict):
                for name, sub in properties.items():
                    order.setdefault(name, (sub, inner))
        keys = [k for k in order if k in value] + [k for k in value if k not in order]
        return {k: _ordered(value[k], *order.get(k, ({}, scope)), depth + 1) for k in keys}
    out = []
    for index, item in enumerate(value):
        sub: tuple[Any, Scope] = ({}, scope)
        for part, inner in parts:
            prefix, items = part.get("prefixItems"), part.get("items")
            if isinstance(prefix, list) and index < len(prefix):
                sub = (prefix[index], inner)
            elif isinstance(items, list):
                sub = (items[index] if index < len(items) else {}, inner)
            elif isinstance(items, dict):
                sub = (items, inner)
            if sub[0]:
                break
        out.append(_ordered(item, *sub, depth + 1))
    return out
