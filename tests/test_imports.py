"""The library's modules import each other without a cycle: each concept has one home,
and a module never needs one that needs it back."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def model_imports() -> dict[str, set[str]]:
    """For each module of model/, the model modules it imports (at any depth of its code)."""
    graph = {}
    for path in sorted((ROOT / "model").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("model"):
                names.add(node.module if node.module != "model" else f"model.{node.names[0].name}")
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names if alias.name.startswith("model.")}
        graph[f"model.{path.stem}"] = names - {f"model.{path.stem}"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes (first = last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_model_has_no_import_cycle():
    graph = model_imports()
    assert "model.strategy" in graph["model.decoding"]  # the graph is read (decoding uses strategy's checks)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
