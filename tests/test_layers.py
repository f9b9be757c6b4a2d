"""The layers run one way: the library never imports the application layer, and no module imports itself back.

The library is everything in `pore` but `pore.app` (the engine, methods, priors, adapters, data, metrics,
calibration, presets, ...); `pore.app` is the application layer (Hydra glue, the Lightning evaluation, the
calibration runner, sweeps, pictures, the speed benchmark). The import graph is read from the sources (every
import statement, those inside functions too), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
APP = "pore.app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "pore").rglob("*.py"))}


def imported(module: str, path: Path) -> Iterator[str]:
    """The pore modules `module` imports (`from pore import compat` is pore.compat: the module it names)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        yield from (name for name in names if name in MODULES and name != module)


GRAPH = {module: set(imported(module, path)) for module, path in MODULES.items()}


def is_app(module: str) -> bool:
    return module == APP or module.startswith(APP + ".")


def test_the_graph_was_read() -> None:
    """The parse found the layers (an empty graph would make the checks below vacuous)."""
    assert {"pore.engine.pruner", "pore.strategy", "pore.app.evaluate", "pore.app.config"} <= set(GRAPH)
    assert "pore.strategy" in GRAPH["pore.engine.pruner"]
    assert "pore.app.config" in GRAPH["pore.app.evaluate"]


def test_the_library_never_imports_the_application_layer() -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() if not is_app(a) for b in deps if is_app(b))
    assert not wrong, "library modules import pore.app:\n" + "\n".join(wrong)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other (directly or through others)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle() -> None:
    """A package's __init__ may import its own modules (registration) and they may import its base module;
    nothing else may close a loop."""

    def within_package(a: str, b: str) -> bool:  # pore.methods -> pore.methods.fastv: registration
        return b.startswith(a + ".") and MODULES[a].name == "__init__.py"

    graph = {a: {b for b in deps if not within_package(a, b)} for a, deps in GRAPH.items()}
    cycles = [group for group in strongly_connected(graph) if len(group) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_import_pore_loads_neither_lightning_nor_hydra() -> None:
    """The library alone: a fresh interpreter that imports `pore` has none of the application's stack."""
    heavy = ("lightning", "hydra", "omegaconf", "wandb", "datasets", "optuna", "matplotlib")
    code = f"import sys, pore; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"import pore loads {result.stdout.strip()}"
