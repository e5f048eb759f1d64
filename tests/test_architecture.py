"""The layout's promises, checked on the source (this pins the architecture on purpose, as
docs/architecture.md describes it): no import cycles in launcher/, and each module imports only its
own layer or the layers below it. Lazy imports inside functions count; imports under
`if TYPE_CHECKING:` (annotations only) do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "launcher"

# top to bottom; a module not listed here fails the test (a new module needs a layer)
LAYERS: dict[str, tuple[str, ...]] = {
    "commands": ("launcher.__main__", "launcher.cli", "launcher.commands"),
    "assembly": ("launcher.train", "launcher.setup", "launcher.local"),
    "loop": ("launcher.loop", "launcher.loop_state", "launcher.resume", "launcher.window"),
    "blocks": (
        "launcher.recipe",
        "launcher.recipe_yaml",
        "launcher.recipe_errors",
        "launcher.components",
        "launcher.plan",
        "launcher.data",
        "launcher.builders",
        "launcher.parallel",
        "launcher.memory",
        "launcher.optim",
        "launcher.losses",
        "launcher.rng",
        "launcher.checkpoint",
        "launcher.checkpointer",
        "launcher.sharded_state",
        "launcher.dcp_safe",
        "launcher.sharding",
        "launcher.rundir",
        "launcher.metrics",
        "launcher.wandb_log",
        "launcher.profiling",
        "launcher.cpu",
        "launcher.models",
        "launcher.datasets",
        "launcher.evaluation",
        "launcher.gradients",
        "launcher.batches",
        "launcher.collate",
        "launcher.data_fit",
        "launcher.streaming",
        "launcher.precision",
    ),
    "infra": (
        "launcher",
        "launcher.env",
        "launcher.nodelist",
        "launcher.distributed",
        "launcher.signals",
        "launcher.logs",
        "launcher.errors",
        "launcher.causes",
        "launcher.storage",
        "launcher.startup",
        "launcher.heartbeat",
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, index = "", -1
    for i, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index >= 0, f"{module} has no layer in tests/test_architecture.py (and docs/architecture.md)"
    return index


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(p, set(paths)) - {m} for m, p in paths.items()}


def test_every_module_imports_only_its_layer_or_below(graph):
    wrong = [
        f"{m} ({list(LAYERS)[layer_of(m)]}) imports {d} ({list(LAYERS)[layer_of(d)]})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if layer_of(d) < layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
