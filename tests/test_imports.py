"""Imports inside tl/ point one way (no cycles, lazy imports counted) and no module outgrows 450 lines."""

import ast
from pathlib import Path

TL = Path(__file__).resolve().parents[1] / "tl"
MAX_LINES = 450


def tl_imports(path: Path) -> set[str]:
    """The tl modules one file imports, from every Import/ImportFrom node (inside functions too)."""
    modules = {p.stem for p in TL.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = node.module or ""
                names = [base] if base else [a.name for a in node.names]
                names = [f"tl.{n}" for n in names]
            elif node.module == "tl":
                names = [f"tl.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tl" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: tl_imports(p) for p in sorted(TL.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None: depth-first search with colours."""
    state = {}  # 1 = on the current path, 2 = done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_tl():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in tl/: " + " -> ".join(f"tl/{m}.py" for m in cycle)


def test_no_module_over_450_lines():
    long = {p.name: n for p in sorted(TL.glob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"tl modules over {MAX_LINES} lines: {long}"
