"""The package's import graph has no cycle, and the layers import only downwards.

Edges come from parsing every module with ``ast``: module-level and function-level imports
alike (a lazy import inside a function is still a dependency), relative imports resolved, an
imported name resolved to its submodule when it is one. Importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``; those implicit package edges are not counted (every
subpackage would otherwise depend on its own ``__init__`` and back).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quotientopt"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, ``__init__.py`` as its package's name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else resolve(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target, stack)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_graph_is_read():
    """The parser sees the edges it must see (a broken parser would find no cycle anywhere)."""
    graph = import_graph()
    assert "quotientopt.nn.adapters" in graph["quotientopt.symmetry.sectors"]
    assert "quotientopt.nn.adapters" in graph["quotientopt.models.gpt"]
    assert "quotientopt.nn.huggingface" in graph["quotientopt.nn"]  # a function-level import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        "import cycle: " + " -> ".join(cycle) + ". Move the shared piece into the lower module, "
        "or register into quotientopt.nn.adapters instead of importing upwards."
    )


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("quotientopt.nn", "quotientopt.models"),
        ("quotientopt.nn", "quotientopt.symmetry"),
        ("quotientopt.nn", "quotientopt.tensorboard"),
        ("quotientopt.symmetry", "quotientopt.tensorboard"),
    ],
)
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    """No module of ``lower`` imports ``upper`` (e.g. nn never imports models: the reference GPT
    registers its attention types into the registry when it is imported)."""
    offending = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module == lower or module.startswith(lower + ".")
        for target in targets
        if target == upper or target.startswith(upper + ".")
    )
    assert not offending, offending
