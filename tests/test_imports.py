"""The package has no import cycle: neither between modules (lazy imports inside functions included) nor
between the sub-packages (models, neurons, train, ...); a sub-package imports only from the layers below its own
(`LAYERS`, the table in CONTRIBUTING.md); and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "neuroshield"


# The parts of the package from the bottom up: a part may import from the layers below its own, never from its own
# layer or above (lazy imports inside functions included). `neuroshield` is the package's __init__ (the version).
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer) for layer in (
    {"neuroshield", "io", "settings", "memory"},
    {"models", "data"},
    {"generate"},
    {"judges", "neurons"},
    {"train", "intervene"},
    {"evaluate"},
    {"report", "config"},
    {"pipeline"},
    {"commands"},
    {"cli"},
))

def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the neuroshield modules it imports anywhere in its body (module level or inside functions)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith(PACKAGE):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str, modules: dict[str, Path]) -> str:
    """neuroshield.models.vlm -> neuroshield.models; top-level modules (neuroshield.config) stand alone."""
    parts = module.split(".")
    if len(parts) >= 3:
        return ".".join(parts[:2])
    return module


def test_no_import_cycle_between_modules() -> None:
    cycles = _cycles(_imports(_modules()))
    assert not cycles, f"modules importing each other (directly or around a loop): {cycles}"


def test_no_import_cycle_between_packages() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, targets in _imports(modules).items():
        pkg = _package_of(module, modules)
        graph.setdefault(pkg, set()).update(_package_of(t, modules) for t in targets)
        graph[pkg].discard(pkg)
    cycles = _cycles(graph)
    assert not cycles, f"sub-packages importing each other: {cycles}"


def _layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every part a that imports a part b of its own layer or above."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if b != a and _layer_of(b) >= _layer_of(a))


def test_every_part_has_a_layer() -> None:
    modules = _modules()
    parts = {_package_of(m, modules).removeprefix(f"{PACKAGE}.") for m in modules}
    assert not [p for p in sorted(parts) if not any(p in layer for layer in LAYERS)], \
        "a new part of the package: give it a layer in LAYERS (and a line in CONTRIBUTING.md)"


def test_parts_import_only_from_the_layers_below() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, targets in _imports(modules).items():
        part = _package_of(module, modules).removeprefix(f"{PACKAGE}.")
        graph.setdefault(part, set()).update(_package_of(t, modules).removeprefix(f"{PACKAGE}.") for t in targets)
    upward = _upward_imports(graph)
    assert not upward, f"imports from the same layer or above (see LAYERS): {upward}"


def test_the_layer_check_finds_an_upward_import() -> None:
    assert _upward_imports({"models": {"io"}, "data": {"models"}, "io": {"report"}}) == ["data -> models", "io -> report"]

def test_the_io_module_imports_nothing_from_the_package() -> None:
    assert _imports(_modules())[f"{PACKAGE}.io"] == set()


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = [m for m in _modules() if not m.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
