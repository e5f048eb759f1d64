"""The layout's promises, checked on the source (this pins the architecture on purpose, as
docs/architecture.md describes it): no import cycles in launcher/, and each module imports only its
own layer or the layers below it. Lazy imports inside functions count; imports under
`if TYPE_CHECKING:` (annotations only) do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "launcher"

# top to bottom, by package (a longer prefix wins: observe's logging sits below the cluster code that
# logs); a module not listed here fails the test (a new package needs a layer)
LAYERS: dict[str, tuple[str, ...]] = {
    "commands": ("launcher.__main__", "launcher.commands"),
    "assembly": ("launcher.train.assemble", "launcher.train.setup", "launcher.train.local"),
    "loop": ("launcher.train",),
    "blocks": (
        "launcher.recipe",
        "launcher.data",
        "launcher.parallel",
        "launcher.checkpoint",
        "launcher.observe",
        "launcher.rng",
        "launcher.hub",  # hub ids, for the models and datasets below
        # the components recipes name by these paths
        "launcher.models",
        "launcher.datasets",
        "launcher.losses",
        "launcher.collate",
    ),
    "infra": (
        "launcher",
        "launcher.errors",
        "launcher.storage",
        "launcher.cluster",
        "launcher.observe.logs",
        "launcher.observe.startup",
        "launcher.observe.heartbeat",
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


def test_every_package_says_what_it_owns():
    silent = [
        str(init.relative_to(PACKAGE.parent))
        for init in PACKAGE.rglob("__init__.py")
        if not ast.get_docstring(ast.parse(init.read_text()))
    ]
    assert not silent, f"packages whose __init__ has no docstring: {silent}"


# The real graph between packages, pinned (launcher.X -> the packages it imports; `launcher` is the
# package's own __init__, its version): the layers above say what may import what, this says what
# does. An import that adds an edge fails here, so that it is a decision, made in the diff, with
# docs/architecture.md; an edge that goes away must be removed here too, so the pin stays the truth.
PINNED: dict[str, set[str]] = {
    "__main__": {"commands", "observe"},
    "checkpoint": {"cluster", "errors", "observe", "storage"},
    "cluster": {"errors", "observe", "storage"},
    "collate": {"data", "errors"},
    "commands": {
        "checkpoint",
        "cluster",
        "data",
        "datasets",
        "errors",
        "hub",
        "launcher",
        "models",
        "observe",
        "parallel",
        "recipe",
        "storage",
        "train",
    },
    "data": {"cluster", "errors", "launcher", "models", "recipe", "rng"},
    "datasets": {"cluster", "errors", "hub", "launcher", "recipe"},
    "hub": {"cluster", "errors", "recipe"},
    "models": {"errors", "hub", "launcher", "parallel", "recipe", "storage"},
    "observe": {"errors", "recipe", "storage"},
    "parallel": {"checkpoint", "cluster", "data", "errors", "observe", "recipe", "rng"},
    "recipe": {"checkpoint", "errors"},
    "rng": {"cluster"},
    "storage": {"errors"},
    "train": {
        "checkpoint",
        "cluster",
        "data",
        "errors",
        "launcher",
        "models",
        "observe",
        "parallel",
        "recipe",
        "rng",
        "storage",
    },
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_graph_between_packages_is_the_pinned_one(graph):
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for dep in deps:
            if package_of(dep) != package_of(module):
                edges.setdefault(package_of(module), set()).add(package_of(dep))
    added = [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a] - PINNED.get(a, set()))]
    gone = [f"{a} -> {b}" for a in sorted(PINNED) for b in sorted(PINNED[a] - edges.get(a, set()))]
    assert not added, f"imports between packages not in tests/test_architecture.py PINNED: {added}"
    assert not gone, f"edges PINNED that no import makes any more (remove them): {gone}"


# What the loop may not read: a parallel dimension other than the data-parallel size and rank (the
# strategy answers for them), or a checkpoint format key (checkpoint/ answers for those).
SEAM_BREACHES = (
    r"(?<!torch)\.(tensor|tp|cp|pp|dp_shard|dp_replicate|hybrid|layout)\b(?!_)",
    r"[\"']sharded[\"']",
    r"\bcopies\b",
    r"isinstance\([^)]*(DistributedDataParallel|FSDPModule|DTensor)",
)


def test_the_loop_names_no_parallel_dimension_and_no_checkpoint_format_key():
    import re

    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted((PACKAGE / "train").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(re.search(p, line.split("#")[0]) for p in SEAM_BREACHES) and "recipe.layout" not in line
    ]
    assert not found, "launcher/train reads what the strategy or the checkpointer owns:\n" + "\n".join(found)


def test_parallel_dims_give_each_rank_its_coordinates_in_mesh_order():
    from launcher.parallel.dims import ParallelDims

    dims = ParallelDims(dp_replicate=2, dp_shard=2, cp=1, tp=2, pp=2)
    assert dims.world_size == 16 and dims.dp_size == 4 and dims.loss_size == 4 and dims.copies == 4
    # row-major over pp, dp_replicate, dp_shard, cp, tp: tp innermost, pp outermost
    assert dims.coords(0) == dict(pp=0, dp_replicate=0, dp_shard=0, cp=0, tp=0)
    assert (
        dims.coords(1)["tp"] == 1
        and dims.coords(8)["pp"] == 1
        and dims.coords(13) == dict(pp=1, dp_replicate=1, dp_shard=0, cp=0, tp=1)
    )
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dims.dp_rank(8) == 0  # the second stage of the first pipeline reads its batch too
    assert dims.loss_ranks() == [8, 10, 12, 14]  # the last stage, one rank of each tensor-parallel group
    assert ParallelDims(dp_shard=2, cp=2).loss_size == 4  # context-parallel ranks read different tokens
    assert dims.describe() == "16 ranks = 2 pipeline x 2 replicate x 2 shard x 2 tensor"
