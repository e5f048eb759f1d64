"""Which strategy a process gets (launcher/parallel/strategy.py's kinds, and pipelined.py's), from
the recipe's parallel dimensions: built once per process, by the run and by `launcher check`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from launcher.parallel.dims import ParallelDims, whole
from launcher.parallel.pipelined import Pipelined
from launcher.parallel.strategy import Replicated, Sharded, Strategy, WholeOfSharded

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe


def build_strategy(
    recipe: Recipe,
    dims: ParallelDims,
    device: torch.device,
    has_process_group: bool,
    comm_hook: Callable[..., Any] | None = None,
) -> Strategy:
    """The strategy for this process, over the recipe's dimensions (`dims_for`). FSDP needs a
    process group (torchrun starts one even for one rank); without one (a plain single process, or
    simulated ranks) the model trains whole."""
    precision = recipe.train.precision
    if not has_process_group:  # the model trains whole: tensor parallelism splits nothing, its arithmetic is dp's
        dims = whole(dims)
    if dims.enabled("pp") and has_process_group:
        return Pipelined(dims, precision, device, recipe)
    if (recipe.dist.strategy != "ddp" or dims.enabled("tp")) and has_process_group:
        return Sharded(dims, precision, device, recipe)
    if dims.world_size > 1 and has_process_group:
        return Replicated(dims, precision, device, recipe, comm_hook)
    if recipe.dist.strategy != "ddp":
        return WholeOfSharded(dims, precision, device, recipe)
    return Strategy(dims, precision, device)
