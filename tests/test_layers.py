"""The house's floors: imports inside ``src/modelcypher`` only point down, and no two modules import each
other, directly or around a circle. Run alone with ``python3 -m pytest tests/test_layers.py``.

The floors, lowest first (a module may import its own floor and the floors below it):
errors -> options, arch, checkpoint -> hf -> merging -> align -> measure -> api -> cli.
``align`` and ``measure`` share a floor in ARCHITECTURE.md; measuring uses alignment, never the reverse,
which is what the order above encodes. Nothing but the CLI's ``demo`` verb imports ``zoo``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modelcypher

ROOT = Path(modelcypher.__file__).parent
FLOORS = {"errors": 0, "options": 1, "arch": 1, "checkpoint": 1, "hf": 2, "merging": 3, "adapters": 3, "align": 4,
          "measure": 5, "transfer": 6, "evolve": 6, "api": 7, "cli": 8, "__main__": 8, "__init__": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported modelcypher module, at module level?)`` for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] == "modelcypher":
                found.append((n, id(node) in top))
    return found


def known(name: str, modules: set[str]) -> str | None:
    """The module an imported name lives in (``a.b.c`` may be the function ``c`` of module ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    local = []
    for m, path in files.items():
        for name, at_top in imports(path):
            target = known(name, set(files))
            if target is None or target == m or target == "modelcypher":
                continue
            if not at_top and floor(m) not in ("cli", "__init__"):
                local.append(f"{m} imports {target} inside a function")
            edges[m].add(target)
    return edges, local


def test_every_import_points_down_and_zoo_is_imported_by_no_one():
    edges, _ = graph()
    upward = []
    for m, targets in edges.items():
        if floor(m) == "zoo":
            continue  # the zoo is a user of the package, above every floor
        for t in targets:
            if floor(t) == "zoo" and m != "modelcypher.cli":
                upward.append(f"{m} imports the zoo ({t})")
            elif floor(t) != "zoo" and FLOORS[floor(t)] > FLOORS[floor(m)]:
                upward.append(f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_function_local_import_of_the_package_outside_the_cli():
    _, local = graph()
    assert not local, "\n".join(sorted(local))


def test_no_import_cycle():
    edges, _ = graph()
    # Tarjan's strongly connected components: a component of two or more modules is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_walk_sees_real_edges():
    """The checks above are not vacuous: known edges of the house are found."""
    edges, _ = graph()
    assert "modelcypher.hf" in edges["modelcypher.align.pipeline"]
    assert "modelcypher.align.pipeline" in edges["modelcypher.measure.barrier"]
    assert "modelcypher.merging.plan" in edges["modelcypher.api"]
