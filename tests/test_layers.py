"""The package's layers (docs/design.md §2): a module imports only from its own layer or lower
ones, and no modules import each other in a cycle. Imports inside functions count too: a lazy
import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_dyt"

# Lowest first. A module belongs to the entry that is its name or the nearest package above it;
# "megatron_dyt" stands for the package's own __init__ only, so a new module needs a place here.
LAYERS: list[tuple[str, ...]] = [
    ("megatron_dyt", "megatron_dyt.config", "megatron_dyt.errors", "megatron_dyt.arguments",
     "megatron_dyt.fileio"),
    ("megatron_dyt.parallel", "megatron_dyt.layout", "megatron_dyt.norms",
     "megatron_dyt.kernels.ops", "megatron_dyt.kernels"),
    ("megatron_dyt.model", "megatron_dyt.info"),
    ("megatron_dyt.data",),
    ("megatron_dyt.checkpoint",),
    ("megatron_dyt.eval", "megatron_dyt.inference", "megatron_dyt.convert.mapping",
     "megatron_dyt.convert.from_hf", "megatron_dyt.convert.outdir"),
    ("megatron_dyt.training",),
    ("megatron_dyt.convert", "megatron_dyt.launch", "megatron_dyt.sweep",
     "megatron_dyt.kernels.bench", "megatron_dyt.kernels.bench_host",
     "megatron_dyt.kernels.bench_step"),
    ("megatron_dyt.cli", "megatron_dyt.config_cli", "megatron_dyt.__main__"),
]  # fmt: skip


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            above = module.startswith(name + ".") and name != "megatron_dyt"
            if (module == name or above) and name.count(".") > depth:
                best, depth = index, name.count(".")
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_layers.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_nodes(child)])
            continue
        yield node
        yield from _nodes(node)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file."""
    found = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import name`: name is a submodule of pkg, or else something pkg defines
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {
        module_name(p): p for p in PACKAGE.rglob("*.py") if "hf_code" not in p.parts
    }  # hf_code/: modeling code copied into exports, not part of the package
    modules = set(files)
    return {m: imports_of(p, modules) - {m} for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in graph.items()
        for d in deps
        if layer_of(d) > layer_of(m)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    "module, bad",
    [
        ("megatron_dyt.checkpoint.format", "megatron_dyt.convert.reshard"),
        ("megatron_dyt.checkpoint.reader", "megatron_dyt.training.trainer"),
        ("megatron_dyt.model.init", "megatron_dyt.data.tokenizer"),
        ("megatron_dyt.config", "megatron_dyt.parallel"),
    ],
)
def test_the_check_catches_a_lower_layer_importing_a_higher_one(module, bad):
    """The old `training/checkpoint.py → convert.reshard` import, and others like it, fail."""
    graph = import_graph()
    graph[module] = graph[module] | {bad}
    assert upward_imports(graph) == [
        f"{module} (layer {layer_of(module)}) imports {bad} (layer {layer_of(bad)})"
    ]


def test_the_check_catches_a_cycle():
    graph = import_graph()
    graph["megatron_dyt.checkpoint.format"] = graph["megatron_dyt.checkpoint.format"] | {
        "megatron_dyt.checkpoint.universal"
    }
    assert any("megatron_dyt.checkpoint.format" in c for c in cycles(graph))
