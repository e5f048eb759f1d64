"""`launcher check --gpu-memory GIB`: the recipe's memory per rank against a GPU of GIB GiB under its
layout, and the first single change that fits when it does not (launcher/parallel/budget.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launcher.data.builders import build_collate
from launcher.data.plan import batch_shape
from launcher.errors import RecipeError
from launcher.parallel import budget, memory, tensor
from launcher.parallel.dims import ParallelDims
from launcher.recipe.components import instantiate
from launcher.recipe.schema import Recipe


def gpu_fit(recipe: Recipe, model: nn.Module, dims: ParallelDims, sample: Any, gib: float) -> tuple[bool, str]:
    """(fits, one line). `model` on the meta device (check builds it there); `sample` the training
    set's first sample (None: activations are not measured)."""
    moments = memory.optimizer_moments(recipe.optimizer)

    def state_for(strategy: str, shard: int, degree: int) -> memory.StateBytes | None:
        """Per rank under `strategy`, sharded over `shard` ranks, layers split over `degree`."""
        split: frozenset[int] = frozenset()
        if degree > 1:
            try:
                split = tensor.split_params(model, tensor.plan_of(model, recipe.dist.tp_plan))
            except RecipeError:  # no tensor-parallel plan for this model
                return None
        return memory.state_plan(model, moments, shard if strategy != "ddp" else 1, degree, split)

    loss_fn = instantiate(recipe.loss, "loss") if recipe.loss is not None else None
    half = recipe.train.precision != "fp32"
    collate = build_collate(recipe) or torch.utils.data.default_collate
    one = collate([sample]) if sample is not None else None

    def activations_for(micro_batch: int, segments: int) -> int | None:
        if one is None or not _on_meta(model):
            return None
        head = recipe.train.activation_checkpointing.head_chunks if segments else 0
        batch = budget.micro_batch_on_meta(one, micro_batch)
        return budget.activation_bytes(model, loss_fn, batch, segments, head, half)

    ac = recipe.train.activation_checkpointing
    segments = ac.segments if isinstance(ac.segments, int) else 0
    micro = batch_shape(recipe, dims.dp_size).micro_batch
    shard = dims.dp_shard if dims.hybrid else dims.dp_size
    state = state_for(recipe.dist.strategy, shard, dims.tp)
    assert state is not None, "check has applied the recipe's own tensor-parallel plan already"
    current = budget.Setting("", budget.Need(state, activations_for(micro, segments)))
    body = len(model) - 1 if isinstance(model, nn.Sequential) and recipe.loss is not None else 0
    tried = budget.alternatives(
        state_for, activations_for, recipe.dist.strategy, shard, dims.tp, dims.world_size, micro, segments, body
    )
    return budget.verdict(gib, current, tried)


def _on_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())
