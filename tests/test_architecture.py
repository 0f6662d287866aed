"""The house rules, checked on the source: no import cycle among the library's modules (lazy imports in functions
included), the core imports no integration, the evidence world or the test fixtures package, no library module
over 400 lines, and no test file named after a tracker number."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"concept_exclusion": ROOT / "plugin", "concept_exclusion.integrations": ROOT / "integrations"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every library module ``name`` imports, at the top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {t for t in [base] + [f"{base}.{a.name}" for a in node.names] if t in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    found.discard(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_and_the_core_imports_no_integration():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    core = {n for n in graph if not n.startswith("concept_exclusion.integrations")}
    crossing = {(n, t) for n in core for t in graph[n] if t.startswith("concept_exclusion.integrations")}
    assert not crossing, crossing
    fixtures = {(n, t) for n in core - {n for n in core if n.startswith("concept_exclusion.testing")}
                for t in graph[n] if t.startswith("concept_exclusion.testing")}
    assert not fixtures, fixtures
    world = [p for p in known.values() if "concept_exclusion_world" in p.read_text(encoding="utf-8")]
    assert not world, world


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_no_test_file_named_after_an_issue():
    named = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "issue" in p.name]
    assert not named, named
