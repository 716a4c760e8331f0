"""The package's shape, checked from its source: no import cycle between distill's units, no private
name imported across modules, no module over 400 lines (issue 21).

A unit is the first component under ``distill/`` (``distill/cache/store.py`` -> ``cache``,
``distill/step.py`` -> ``step``). Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
MAX_LINES = 400


def module_name(path: Path) -> str:
    """Return the dotted module name of ``path`` under the package (``distill.cache.store``)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> List[Tuple[str, List[str]]]:
    """Return ``(imported distill module, names taken from it)`` for every import in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "distill"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "distill":
                out.append((target, [alias.name for alias in node.names]))
    return out


def unit(module: str) -> str:
    """Return the unit of a dotted distill module name (``distill`` itself for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "distill"


def unit_graph() -> Dict[str, Set[str]]:
    """Return unit -> units it imports (self-edges and the package root left out)."""
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = unit(module_name(path))
        if source == "distill":
            continue
        edges = graph.setdefault(source, set())
        for target, names in imports(path):
            if target == "distill":  # `from distill import cache`: the named submodules are the units
                edges.update(n for n in names if (PACKAGE / n).exists() or (PACKAGE / f"{n}.py").exists())
            else:
                edges.add(unit(target))
        edges.discard(source)
        edges.discard("distill")
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Return the strongly connected components of ``graph`` with more than one unit (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_their_units():
    # the resolver of relative imports on a real module of the package
    targets = [t for t, _ in imports(PACKAGE / "cache" / "store.py")]
    assert all(t.startswith("distill") for t in targets)
    assert any(t.startswith("distill.cache.") for t in targets)  # its siblings, written `from .x import`


def test_no_import_cycle_between_units():
    graph = unit_graph()
    assert {"cache", "engine", "data", "policies", "step"} <= set(graph)
    assert cycles(graph) == []


def test_no_private_name_imported_across_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports(path):
            offenders += [f"{module_name(path)} imports {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
