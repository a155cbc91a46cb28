"""An instance as its leaves: {JSON pointer: scalar or empty container}, the unit the reference comparison
counts, and how large and deep an instance is (measured without recursion, stopping past the limits)."""

from __future__ import annotations

from typing import Any

from dgemma_ft.tasks.json.messages import escape_token


def leaves(value: Any) -> dict[str, Any]:
    """{JSON pointer: leaf} for every scalar and every empty object/array (iterative: any depth)."""
    out: dict[str, Any] = {}
    stack = [("", value)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, dict) and node:
            for key, child in node.items():
                stack.append((f"{at}/{escape_token(key)}", child))
        elif isinstance(node, list) and node:
            for index, child in enumerate(node):
                stack.append((f"{at}/{index}", child))
        else:
            out[at] = node
    return out


def same_leaf(a: Any, b: Any) -> bool:
    """Leaf equality: numbers numerically (1 == 1.0), booleans only with booleans, the rest by type and value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def measure(value: Any, node_limit: int, depth_limit: int) -> tuple[int, int]:
    """(values, deepest level), counting stops early past the limits."""
    nodes, deepest = 0, 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        deepest = max(deepest, depth)
        if nodes > node_limit or deepest > depth_limit:
            break
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return nodes, deepest
