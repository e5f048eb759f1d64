"""How the world's ranks are laid out: data-parallel replicas x data-parallel shards x tensor-parallel
ranks, with the tensor dimension innermost (the ranks of one tensor-parallel group are consecutive,
so they share a node when a node's ranks are consecutive, as torchrun and SLURM number them).

Everything about data and the loss's weights uses the data-parallel size and rank, never the world
size: the ranks of one tensor-parallel group read the same batch and compute one replica's step."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import RecipeError


@dataclass(frozen=True)
class Layout:
    replicate: int  # data-parallel replicas: each holds the whole model (ddp) or one shard group (hsdp)
    shard: int  # data-parallel ranks one replica is sharded over (fsdp, hsdp); 1 under ddp
    tensor: int = 1  # ranks one layer is split over (dist.tensor_parallel)
    hybrid: bool = False  # hsdp: FSDP's 2-D data-parallel mesh (replicas x shards), even of one replica

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard * self.tensor

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many different batches one step reads at once."""
        return self.replicate * self.shard

    def dp_rank(self, rank: int) -> int:
        return rank // self.tensor

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor

    def dims(self) -> tuple[tuple[str, int], ...]:
        """The mesh's named dimensions larger than 1, outermost first (a 1-D mesh when only one is)."""
        named = (("dp_replicate", self.replicate), ("dp_shard", self.shard), ("tp", self.tensor))
        return tuple((name, size) for name, size in named if size > 1) or (("dp_shard", 1),)

    def describe(self) -> str:
        """`8 ranks = 2 replicate x 2 shard x 2 tensor`."""
        parts = [
            f"{n} {name}" for name, n in (("replicate", self.replicate), ("shard", self.shard), ("tensor", self.tensor))
        ]
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"{ranks} = {' x '.join(parts)}"


def build_layout(strategy: str, world_size: int, tensor: int, shard_group: int | None) -> Layout:
    """The layout of `world_size` ranks under dist.strategy and dist.tensor_parallel; `shard_group`:
    hsdp's ranks per shard group (already resolved: the recipe's, or one node's data-parallel ranks).
    A layout that does not multiply to the world size is one line naming the key."""
    if world_size % tensor:
        raise RecipeError(
            "dist.tensor_parallel",
            f"{tensor} does not divide the world size {world_size}; use a divisor of {world_size} "
            f"({', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)})",
        )
    dp = world_size // tensor
    if strategy == "ddp":
        return Layout(replicate=dp, shard=1, tensor=tensor)
    if strategy == "fsdp":
        return Layout(replicate=1, shard=dp, tensor=tensor)
    group = shard_group or dp
    if dp % group:
        ranks = (
            f"the world size {world_size}" if tensor == 1 else f"the {dp} data-parallel ranks ({world_size} / {tensor})"
        )
        raise RecipeError(
            "dist.fsdp.shard_group_size",
            f"{group} does not divide {ranks}; hsdp needs whole shard groups (replicas x shard_group_size ranks)",
        )
    return Layout(replicate=dp // group, shard=group, tensor=tensor, hybrid=True)


def node_warning(layout: Layout, local_world_size: int) -> str | None:
    """Tensor-parallel groups should stay inside a node: their all-reduces run in every layer's
    forward and backward, which a network between nodes slows by an order of magnitude."""
    if layout.tensor == 1 or local_world_size % layout.tensor == 0:
        return None
    return (
        f"dist.tensor_parallel={layout.tensor} does not divide the {local_world_size} ranks of a node: some "
        "tensor-parallel groups span nodes, and their per-layer all-reduces cross the network; use a divisor "
        f"of {local_world_size}"
    )
