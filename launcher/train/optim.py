"""Optimizer and learning-rate schedule from the recipe. Schedulers step once per optimizer step."""

from __future__ import annotations

import warnings

import torch
from torch.optim.lr_scheduler import LinearLR, LRScheduler, SequentialLR

from launcher.observe import startup
from launcher.recipe.components import instantiate
from launcher.recipe.schema import Recipe
from launcher.train.loop_state import Optimization


def build_optimization(recipe: Recipe, model: torch.nn.Module, device: torch.device) -> Optimization:
    """The optimizer over the model's trainable parameters as they are now (FSDP's shards, once
    sharded), its schedule, and fp16's gradient scaler."""
    startup.mark("optimizer_start")
    optimizer = build_optimizer(recipe, model)
    startup.mark("optimizer")
    scaler = torch.amp.GradScaler(device.type) if recipe.train.precision == "fp16" else None
    return Optimization(optimizer, build_scheduler(recipe, optimizer), scaler)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return instantiate(recipe.optimizer, "optimizer", params)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """The recipe's scheduler, preceded by `train.warmup_steps` of linear warmup from lr/(w+1) to lr."""
    main = instantiate(recipe.scheduler, "scheduler", optimizer) if recipe.scheduler else None
    w = recipe.train.warmup_steps
    if w == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / (w + 1), end_factor=1.0, total_iters=w)
    if main is None:
        return warmup
    # older torch's SequentialLR (2.4, not 2.14) calls step(0) itself at the milestone and warns the caller
    # that passing an epoch is deprecated: noise about torch's own code, not the recipe
    warnings.filterwarnings(
        "ignore",
        message=r"The epoch parameter in `scheduler\.step\(\)` was not necessary",
        category=UserWarning,
        module=r"torch\.optim\.lr_scheduler",
    )
    return SequentialLR(optimizer, [warmup, main], milestones=[w])
