"""The package's modules import each other without a loop, deferred imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rainforest", "kernels")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_script_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` -- its body runs with the file as ``__main__``, never
    while the module itself is being imported, so what it imports cannot close a loop."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__"
                    for c in test.comparators))


def _walk_outside_script_guards(tree: ast.AST):
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node)
                       if not _is_script_guard(child))


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """Modules of ours named by any import in the tree: top level, in a function, or by string
    (a script guard's body left out)."""
    found = set()
    for node in _walk_outside_script_guards(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)  # importlib.import_module("rainforest.x")
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    modules = {_module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name = _module_name(path)
        # A package's own __init__ is where lazy names point from, not a stage: leave it out.
        graph[name] = _imported(ast.parse(path.read_text()), modules) - set(PACKAGES) - {name}
    return graph


def find_loop(graph: dict[str, set[str]]) -> list[str]:
    """One import loop as a path of module names (first == last), or [] if there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (loop := visit(target, [*path, target])):
                return loop
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (loop := visit(start, [start])):
            return loop
    return []


def test_the_finder_reports_a_loop_it_is_given():
    assert find_loop({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_loop({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_deferred_and_string_imports():
    tree = ast.parse("def f():\n    from rainforest.x import y\n"
                     "importlib.import_module('rainforest.z')\nimport rainforest.w")
    modules = {"rainforest.x", "rainforest.z", "rainforest.w", "rainforest.v"}
    assert _imported(tree, modules) == {"rainforest.x", "rainforest.z", "rainforest.w"}


def test_the_graph_leaves_out_what_only_a_script_guard_imports():
    tree = ast.parse("import rainforest.x\nif __name__ == '__main__':\n"
                     "    from rainforest.cli import run_stage\n"
                     "if __name__ == 'other':\n    import rainforest.w\n")
    modules = {"rainforest.x", "rainforest.cli", "rainforest.w"}
    assert _imported(tree, modules) == {"rainforest.x", "rainforest.w"}


def test_the_package_has_no_import_loop():
    graph = import_graph()
    assert "rainforest.train" in graph and "kernels.fused_loop" in graph  # the walk found them
    assert find_loop(graph) == []
