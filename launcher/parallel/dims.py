"""The named parallel dimensions of a run, in the manner of torchtitan's `ParallelDims`: one object
holds each dimension's size, the device mesh with its sub-meshes by name, and every rank's
coordinates. A new dimension is one entry in `ORDER`, not a field threaded through the code.

The dimensions, outermost first (`ORDER`):
- `pp`: pipeline stages (each holds some of the layers);
- `dp_replicate`: data-parallel replicas (each the whole model under ddp, one shard group under hsdp);
- `dp_shard`: data-parallel ranks one replica is sharded over (fsdp, hsdp); 1 under ddp;
- `cp`: ranks one sample's sequence is split over;
- `tp`: ranks one layer is split over (innermost: a tensor-parallel group's ranks are consecutive,
  so they share a node when a node's ranks are consecutive, as torchrun and SLURM number them).

What reads which:
- the data uses the data-parallel size and rank (`dp_size`, `dp_rank`): the ranks of one pipeline,
  context or tensor group read the same batch;
- token counts and evaluation sums add over the ranks that read different tokens (`loss_size`:
  data-parallel x cp); every other rank holds a copy (`copies`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from launcher.recipe.schema import Recipe

ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first: a rank's coordinates in this order
DATA = ("dp_replicate", "dp_shard")  # the dimensions whose ranks read different batches
TOKENS = (*DATA, "cp")  # ... and different tokens of them: the loss's token counts add over these
LABELS = {"pp": "pipeline", "dp_replicate": "replicate", "dp_shard": "shard", "cp": "context", "tp": "tensor"}


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    hybrid: bool = False  # hsdp: FSDP's 2-D data-parallel mesh (replicas x shards), even of one replica
    _mesh: list[Any] = field(
        default_factory=list, compare=False, repr=False
    )  # built once, on first use (then the flattened data mesh)

    def size(self, name: str) -> int:
        return int(getattr(self, name))

    @property
    def sizes(self) -> dict[str, int]:
        """Every dimension's size, outermost first."""
        return {name: self.size(name) for name in ORDER}

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many different batches one step reads at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def loss_size(self) -> int:
        """Ranks that read different tokens (data-parallel x context-parallel): the loss's token
        counts and evaluation sums add over these."""
        return math.prod(self.size(name) for name in TOKENS)

    @property
    def copies(self) -> int:
        """Ranks that hold each token's count alike (a tensor-parallel group reads one batch, as do a
        pipeline's stages): a sum over every rank counts each token this many times."""
        return self.world_size // self.loss_size

    def enabled(self, name: str) -> bool:
        return self.size(name) > 1

    def coords(self, rank: int) -> dict[str, int]:
        """`rank`'s coordinate along each dimension (row-major over `ORDER`, as the mesh numbers them)."""
        coords: dict[str, int] = {}
        for name in reversed(ORDER):
            rank, coords[name] = divmod(rank, self.size(name))
        return {name: coords[name] for name in ORDER}

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of `rank`: which batch of a step it reads."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def ranks_where(self, **coords: int) -> list[int]:
        """The ranks at these coordinates (any coordinate along the others); a negative one counts
        from the end, as in `ranks_where(pp=-1)`: the last stage."""
        want = {name: c % self.size(name) for name, c in coords.items()}
        return [r for r in range(self.world_size) if all(self.coords(r)[n] == c for n, c in want.items())]

    def loss_ranks(self) -> list[int]:
        """The ranks whose loss counts in the log: one of each tensor-parallel group (which computes
        one loss alike), on the last pipeline stage (which alone computes it)."""
        return self.ranks_where(tp=0, pp=-1)

    def mesh_dims(self) -> tuple[tuple[str, int], ...]:
        """The mesh's named dimensions, outermost first: `dp_shard` always (FSDP's), `dp_replicate`
        where there are replicas or hsdp asks for its 2-D mesh, the others where larger than 1."""
        keep = {"dp_shard"} | ({"dp_replicate"} if self.dp_replicate > 1 or self.hybrid else set())
        return tuple((name, n) for name, n in self.sizes.items() if n > 1 or name in keep)

    def describe(self) -> str:
        """`8 ranks = 2 replicate x 2 shard x 2 tensor`: the data-parallel and tensor dimensions always,
        the others where they are on."""
        parts = [f"{n} {LABELS[name]}" for name, n in self.sizes.items() if name in (*DATA, "tp") or n > 1]
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"{ranks} = {' x '.join(parts)}"

    def mesh(self, device: torch.device) -> DeviceMesh:
        """The device mesh over every dimension larger than 1 (built once, on first use: ddp alone
        needs none), always with an explicit device type: left to guess on a machine with GPUs, a
        gloo run moved parameters to CUDA (pytorch #132471)."""
        if not self._mesh:
            from torch.distributed.device_mesh import init_device_mesh

            kind = "cuda" if device.type == "cuda" else "cpu"
            named = self.mesh_dims()
            mesh = init_device_mesh(kind, tuple(n for _, n in named), mesh_dim_names=tuple(n for n, _ in named))
            self._check_coords(mesh)
            self._mesh.append(mesh)
        return self._mesh[0]

    def sub_mesh(self, device: torch.device, names: tuple[str, ...]) -> DeviceMesh:
        """The sub-mesh over those of `names` the mesh has (in its order): FSDP's data-parallel part,
        a tensor-parallel group, a pipeline."""
        mesh = self.mesh(device)
        have = tuple(n for n in mesh.mesh_dim_names or () if n in names)
        return mesh if have == tuple(mesh.mesh_dim_names or ()) else mesh[have]

    def data_mesh(self, device: torch.device) -> DeviceMesh:
        """The mesh the gradients are reduced over (FSDP's): the data-parallel ranks and, folded into
        the shard dimension as torchtitan does (`dp_shard_cp`), the context-parallel ones, whose
        gradients are of different tokens of the same samples. 2-D (replicas x shards) under hsdp."""
        if not self.enabled("cp"):
            return self.sub_mesh(device, DATA)
        mesh = self.mesh(device)
        if not self._mesh[1:]:  # flattened once: each call would make another process group
            self._mesh.append(mesh[("dp_shard", "cp")]._flatten("dp_shard_cp"))
        names = mesh.mesh_dim_names or ()
        return mesh[("dp_replicate", "dp_shard_cp")] if "dp_replicate" in names else self._mesh[1]

    def _check_coords(self, mesh: DeviceMesh) -> None:
        """The coordinates worked out here are the mesh's (a bug, not a user's error, if not)."""
        import torch.distributed as dist

        mine = self.coords(dist.get_rank())
        for name in mesh.mesh_dim_names or ():
            if name in mine and self.size(name) == mesh[name].size():
                assert mesh.get_local_rank(name) == mine[name], (name, mesh.get_local_rank(name), mine)


def build_dims(
    strategy: str, world_size: int, tensor: int, shard_group: int | None, pipeline: int = 1, context: int = 1
) -> ParallelDims:
    """The dimensions of `world_size` ranks under dist.strategy, dist.tensor_parallel,
    dist.pipeline_parallel and dist.context_parallel; `shard_group`: hsdp's ranks per shard group
    (already resolved: the recipe's, or one node's data-parallel ranks). Dimensions that do not
    multiply to the world size are one line naming the key."""
    divisors = ", ".join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)
    if world_size % tensor:
        raise RecipeError(
            "dist.tensor_parallel",
            f"{tensor} does not divide the world size {world_size}; use a divisor of {world_size} ({divisors})",
        )
    if world_size % (tensor * pipeline):
        within = f"the {world_size // tensor} ranks left by dist.tensor_parallel={tensor}" if tensor > 1 else ""
        raise RecipeError(
            "dist.pipeline_parallel",
            f"{pipeline} does not divide {within or f'the world size {world_size}'}; the world size must be "
            f"pipeline_parallel x tensor_parallel x the data-parallel ranks (divisors of {world_size}: {divisors})",
        )
    if world_size % (tensor * pipeline * context):
        left = world_size // (tensor * pipeline)
        raise RecipeError(
            "dist.context_parallel",
            f"{context} does not divide the {left} ranks left by dist.tensor_parallel x dist.pipeline_parallel; the "
            "world size must be pipeline_parallel x context_parallel x tensor_parallel x the data-parallel ranks "
            f"(divisors of {world_size}: {divisors})",
        )
    dp = world_size // (tensor * pipeline * context)
    if strategy == "ddp":
        return ParallelDims(dp_replicate=dp, cp=context, tp=tensor, pp=pipeline)
    if strategy == "fsdp":
        return ParallelDims(dp_shard=dp, cp=context, tp=tensor, pp=pipeline)
    group = shard_group or dp
    if dp % group:
        model = tensor * pipeline * context
        ranks = (
            f"the world size {world_size}" if model == 1 else f"the {dp} data-parallel ranks ({world_size} / {model})"
        )
        raise RecipeError(
            "dist.fsdp.shard_group_size",
            f"{group} does not divide {ranks}; hsdp needs whole shard groups (replicas x shard_group_size ranks)",
        )
    return ParallelDims(dp_replicate=dp // group, dp_shard=group, cp=context, tp=tensor, pp=pipeline, hybrid=True)


def dims_for(recipe: Recipe, world_size: int, local_world_size: int | None = None) -> ParallelDims:
    """This recipe's dimensions over `world_size` ranks (hsdp's shard groups: the recipe's size, else
    one node's data-parallel ranks)."""
    tensor, pipeline, context = recipe.dist.tensor_parallel, recipe.dist.pipeline_parallel, recipe.dist.context_parallel
    group = None
    if recipe.dist.strategy == "hsdp":
        model = tensor * pipeline * context
        group = recipe.dist.fsdp.shard_group_size or max(1, (local_world_size or world_size) // model)
    return build_dims(recipe.dist.strategy, world_size, tensor, group, pipeline, context)


def whole(dims: ParallelDims) -> ParallelDims:
    """The same data-parallel arithmetic with the model whole in each process: no process group
    splits a layer or a sequence (a plain single process, or simulated ranks)."""
    return ParallelDims(dims.dp_replicate, dims.dp_shard, hybrid=dims.hybrid)


def node_warning(dims: ParallelDims, local_world_size: int) -> str | None:
    """Tensor-parallel groups should stay inside a node: their all-reduces run in every layer's
    forward and backward, which a network between nodes slows by an order of magnitude."""
    if dims.tp == 1 or local_world_size % dims.tp == 0:
        return None
    return (
        f"dist.tensor_parallel={dims.tp} does not divide the {local_world_size} ranks of a node: some "
        "tensor-parallel groups span nodes, and their per-layer all-reduces cross the network; use a divisor "
        f"of {local_world_size}"
    )
