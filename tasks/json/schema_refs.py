"""Which subschemas describe one instance, with `$ref` followed the way jsonschema follows it: through a
`referencing` registry holding the schema, so JSON pointers (`#/$defs/x`, `#/definitions/x`), anchors, `$id`
bases and refs relative to them resolve as they do when validating. Nothing is fetched: a ref outside the schema
is left unresolved. Hop and node limits end self-referential schemas."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from referencing import Registry, Specification
from referencing.jsonschema import DRAFT202012, specification_with

MAX_REF_HOPS = 8  # `$ref`s followed one after another by `resolve`
MAX_SUBSCHEMAS = 32  # schemas visited by `subschemas` for one instance


class _Registry:
    """The registry of one schema, built on its first lookup (most schemas have no `$ref`, and targets are
    ordered often)."""

    def __init__(self, root: Any, specification: Specification):
        self.root, self.specification, self._resolver = root, specification, None

    def resolver(self) -> Any:
        """The resolver at the root (a `referencing` Resolver; the package does not export the class)."""
        if self._resolver is None:
            self._resolver = Registry().resolver_with_root(self.specification.create_resource(self.root))
        return self._resolver


@dataclass(frozen=True)
class Scope:
    """Where a subschema sits, for looking up its `$ref`s: the resolver of the last ref that led here (None: the
    root's) and the subschemas with their own `$id` entered since then, which move the base URI."""

    registry: _Registry
    resolver: Any = None
    entered: tuple = ()

    @classmethod
    def of_root(cls, root: Any) -> Scope:
        """The scope of a whole schema: its `$schema` picks the dialect (Draft 2020-12 when absent or unknown)."""
        dialect = root.get("$schema") if isinstance(root, dict) else None
        return cls(_Registry(root, specification_with(dialect if isinstance(dialect, str) else "",
                                                      default=DRAFT202012)))

    def enter(self, schema: Any) -> Scope:
        """The scope inside `schema` (a subschema with its own `$id` moves the base URI, as in jsonschema)."""
        try:
            if not isinstance(schema, dict) or self.registry.specification.id_of(schema) is None:
                return self
        except Exception:  # an odd `$id`: stay where we are
            return self
        return Scope(self.registry, self.resolver, (*self.entered, schema))

    def lookup(self, ref: str) -> tuple[Any, Scope] | None:
        """(the schema `ref` points to, its scope), or None when it cannot be resolved."""
        try:
            resolver = self.resolver or self.registry.resolver()
            for schema in self.entered:
                resolver = resolver.in_subresource(self.registry.specification.create_resource(schema))
            resolved = resolver.lookup(ref)
        except Exception:  # Unresolvable, an `$id` that is not text, a pointer naming a list item by a word, ...
            return None
        return resolved.contents, Scope(self.registry, resolved.resolver)

    def resolve(self, schema: Any) -> tuple[Any, Scope]:
        """`schema` with its chain of `$ref`s followed (at most MAX_REF_HOPS) and the scope it lands in; a ref
        that cannot be resolved ends the chain there."""
        scope = self.enter(schema)
        for _ in range(MAX_REF_HOPS):
            ref = schema.get("$ref") if isinstance(schema, dict) else None
            found = scope.lookup(ref) if isinstance(ref, str) else None
            if found is None:
                break
            schema, scope = found
            scope = scope.enter(schema)
        return schema, scope


def resolve(schema: Any, root: Any = None) -> Any:
    """`schema` with its `$ref` chain followed, refs looked up in `root` (default: `schema` itself)."""
    return Scope.of_root(schema if root is None else root).resolve(schema)[0]


def subschemas(schema: Any, scope: Scope) -> list[tuple[dict, Scope]]:
    """The schema and the subschemas that also describe the same instance (`$ref` targets, `allOf`/`anyOf`/
    `oneOf`, `then`/`else`), each with its scope; at most MAX_SUBSCHEMAS are visited."""
    out: list[tuple[dict, Scope]] = []
    queue: deque[tuple[Any, Scope]] = deque([(schema, scope)])
    visited = 0
    while queue and visited < MAX_SUBSCHEMAS:
        node, outer = queue.popleft()
        visited += 1
        if not isinstance(node, dict):
            continue
        inner = outer.enter(node)
        out.append((node, inner))
        found = inner.lookup(node["$ref"]) if isinstance(node.get("$ref"), str) else None
        if found is not None:
            queue.append(found)
        for keyword in ("allOf", "anyOf", "oneOf"):
            if isinstance(node.get(keyword), list):
                queue.extend((part, inner) for part in node[keyword])
        for keyword in ("then", "else"):
            if isinstance(node.get(keyword), dict):
                queue.append((node[keyword], inner))
    return out
