"""Imports inside tl/ point one way: down the stack of subpackages, never in a circle (lazy imports counted).

The stack, bottom first (docs/development.md says what each holds):

    core       errors, command lines, stop signals, atomic files, the Config
    data       images on disk to batches
    model      the network by name, its evaluation and metrics
    runs       the run directory and what it holds
    train      a run built and trained
    inference  a trained model used
    tl/*.py    the commands (python -m tl.X): they import the stack, never each other
"""

import ast
from pathlib import Path

TL = Path(__file__).resolve().parents[1] / "tl"
STACK = ["core", "data", "model", "runs", "train", "inference"]
COMMANDS = "commands"  # the modules directly in tl/


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(TL.parent).with_suffix("").parts).removesuffix(".__init__")


def tl_imports(path: Path) -> set[str]:
    """The tl modules one file imports (tl.data.listing, ...), from every Import/ImportFrom node, inside
    functions too. `from tl.data import listing` counts as tl.data.listing."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: use absolute imports (from tl.X import ...)"
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module else []
        else:
            continue
        for name in names:
            while name.startswith("tl.") and not (TL.parent / (name.replace(".", "/") + ".py")).is_file():
                name = name.rsplit(".", 1)[0]  # drop the imported name: the module holding it remains
            if name.startswith("tl."):
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): tl_imports(p) for p in sorted(TL.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else COMMANDS


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


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a subpackage to one above it in STACK, and every import between two commands."""
    order = {name: i for i, name in enumerate([*STACK, COMMANDS])}
    wrong = []
    for module, imports in sorted(graph.items()):
        for imported in sorted(imports):
            a, b = layer(module), layer(imported)
            if order[b] > order[a] or (a == b == COMMANDS and module != "tl"):
                wrong.append(f"{module} -> {imported}")
    return wrong


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_upward_finds_an_import_that_climbs_and_one_between_commands():
    graph = {"tl.data.listing": {"tl.runs.rundir"}, "tl.runs.rundir": {"tl.core.files"},
             "tl.predict": {"tl.export", "tl.inference.trained"}}
    assert upward(graph) == ["tl.data.listing -> tl.runs.rundir", "tl.predict -> tl.export"]


def test_every_subpackage_has_its_place_in_the_stack():
    found = {p.name for p in TL.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert found == set(STACK)


def test_no_import_cycles_in_tl():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in tl/: " + " -> ".join(cycle)


def test_imports_point_down_the_stack():
    wrong = upward(import_graph())
    assert not wrong, f"imports against the stack {' < '.join(STACK)} < commands: {wrong}"
