"""No module of serving/ is part of an import cycle, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parents[2] / "serving"


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement anywhere in ``tree`` names, as a dotted path."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this package
                base = ".".join([package, *([base] if base else [])])
            found.add(base)
            # `from serving import app` imports the module serving.app
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def serving_graph() -> dict[str, set[str]]:
    modules = {f"serving.{path.stem}": path for path in SERVING.glob("*.py")}
    return {
        name: (imported_modules(ast.parse(path.read_text()), "serving") & modules.keys()) - {name}
        for name, path in modules.items()
    }


def cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first)."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_graph_sees_function_level_and_package_imports() -> None:
    tree = ast.parse("def f():\n    from serving import app\n    import serving.cli as c\n")
    assert imported_modules(tree, "serving") >= {"serving.app", "serving.cli"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle_through("a", graph) == ["a", "b", "c", "a"]
    assert cycle_through("d", graph) is None


def test_no_serving_module_is_in_an_import_cycle() -> None:
    graph = serving_graph()
    assert {"serving.backends", "serving.trt_backend", "serving.contract"} <= graph.keys()
    cycles = [cycle for name in sorted(graph) if (cycle := cycle_through(name, graph))]
    assert cycles == [], " ; ".join(" -> ".join(cycle) for cycle in cycles)
