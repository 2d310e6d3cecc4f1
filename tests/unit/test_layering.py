"""The package's layering, read from the source (every import statement, deferred ones included):

    chunkformer (core)  <-  chunkformer.kernels  <-  recipes  <-  benchmarks, studies, examples

each layer imports only the layers to its left, and the core's modules import each other without a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("chunkformer", "recipes", "benchmarks", "studies", "examples")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from pkg import name`` gives ``pkg.name`` when that is a
    module of this repository, else ``pkg``)."""
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m.split(".")[0] in TOP}


FILES = [p for top in TOP if (ROOT / top).is_dir() for p in sorted((ROOT / top).rglob("*.py"))]
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports(p) for p in FILES}


def layer(module: str) -> str:
    if module == "chunkformer.kernels" or module.startswith("chunkformer.kernels."):
        return "kernels"
    return "core" if module.split(".")[0] == "chunkformer" else module.split(".")[0]


ALLOWED = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "recipes": {"core", "kernels", "recipes"},
    "benchmarks": {"core", "kernels", "recipes", "benchmarks"},
    "studies": {"core", "kernels", "recipes", "studies"},
    "examples": {"core", "kernels", "recipes", "examples"},
}


def test_the_graph_sees_the_packages_imports():
    assert "chunkformer.scaffold" in GRAPH["chunkformer.kernels.scaffold"]  # relative imports resolved
    assert "chunkformer.kernels" in GRAPH["recipes.sampling"]
    assert "chunkformer.grid" in GRAPH["chunkformer.scaffold"]


@pytest.mark.parametrize("source", sorted(GRAPH))
def test_each_module_imports_only_the_layers_below_it(source):
    bad = sorted(t for t in GRAPH[source] if layer(t) not in ALLOWED[layer(source)])
    assert not bad, f"{source} ({layer(source)}) imports {bad}"


def test_the_core_and_the_kernels_import_without_a_cycle():
    graph = {m: {t for t in ts if t in GRAPH and layer(t) in ("core", "kernels")}
             for m, ts in GRAPH.items() if layer(m) in ("core", "kernels")}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t == m or (m.startswith(t + ".") and t in graph):  # a package's own submodules import the package
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
