"""The model side of a run: build it (or its meta-device skeleton), put a checkpoint's weights in,
wrap it for the step (activation checkpointing, DDP or FSDP, torch.compile), and give a
meta-device model its shards."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher import rng
from launcher.checkpoint import checkpointer, frozen
from launcher.cluster.distributed import Session
from launcher.cluster.env import ClusterEnv
from launcher.data import loss_mean
from launcher.data.batches import LossFn
from launcher.data.builders import build_model
from launcher.data.plan import Plan
from launcher.errors import RecipeError
from launcher.observe import startup
from launcher.observe.heartbeat import Heartbeat, phase
from launcher.observe.logs import log
from launcher.parallel import memory, wrap
from launcher.parallel.memory import state_checkpoint_bytes
from launcher.parallel.precision import autocast
from launcher.parallel.strategy import Strategy
from launcher.recipe.components import instantiate, resolve_callable
from launcher.recipe.schema import Recipe
from launcher.train import resume
from launcher.train.loop_state import Modules


def model(
    recipe: Recipe,
    env: ClusterEnv,
    sess: Session,
    plan: Plan,
    resume_from: Path | None,
    strategy: Strategy,
    heartbeat: Heartbeat | None = None,
) -> tuple[torch.nn.Module, dict | None, str | None]:
    """The model, with a checkpoint's weights (and that checkpoint, checked, for the rest), and the
    fingerprint of its frozen parameters as built (launcher/checkpoint/frozen.py). Under
    `strategy.meta_init` (dist.fsdp.meta_init): no weights until each rank's shards exist (materialize)."""
    on_meta = strategy.meta_init
    startup.mark("model_start")
    with phase(heartbeat, "building the model"), torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_model(recipe)
    startup.mark("model")
    if env.is_main and (space := recipe.layout.space_warning(state_checkpoint_bytes(model))):
        log.warning(space)
    ac = recipe.train.activation_checkpointing
    wrap.check_segments(model, ac.segments if isinstance(ac.segments, int) else 0, ac.head_chunks)
    if ac.modules:  # before sharding: FSDP's hooks then run around each recomputed block
        wrap.checkpoint_modules(model, ac.modules)
    strategy.prepare(model)
    base = frozen.fingerprint(model)  # before any sharding: the same at every layout
    payload = None
    if resume_from is not None:
        with phase(heartbeat, f"loading the checkpoint {resume_from}"):
            payload = resume.load_for_resume(resume_from, model, recipe, plan, base, not on_meta)
    if not on_meta:
        startup.mark("device_start")
        model.to(sess.device)  # on a GPU: the CUDA context and the copy, which any program pays
        startup.mark("device")
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    # same initial weights on every rank (above); per-replica streams for dropout and the like (below):
    # the ranks of one tensor-parallel group compute one replica, alike
    rng.seed_everything(recipe.seed + strategy.dims.dp_rank(env.rank))
    return model, payload, base


def loss(recipe: Recipe) -> LossFn | None:
    """The loss component, or None: the model computes its own (launcher/data/batches.py)."""
    if recipe.loss is None:
        return None
    loss_fn = instantiate(recipe.loss, "loss")
    if not callable(loss_fn):
        raise RecipeError(
            "loss._component_",
            f"{recipe.loss['_component_']} built a {type(loss_fn).__name__}, which "
            "cannot be called; name a loss module or function",
        )
    loss_mean.check_reduction(loss_fn)  # a sum (or none) would train differently on each layout
    return loss_fn


def train_module(
    recipe: Recipe,
    device: torch.device,
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    loader: torch.utils.data.DataLoader,
    strategy: Strategy,
) -> torch.nn.Module:
    """What the step calls: activation checkpointing, then the strategy's DDP or FSDP, then torch.compile."""
    ac = recipe.train.activation_checkpointing
    segments, head_chunks = memory.resolve_segments(
        ac, model, loss_fn, loader, device, lambda: autocast(recipe.train.precision, device)
    )
    return strategy.wrap(model, loss_fn, segments=segments, head_chunks=head_chunks, compile_=recipe.train.compile)


def modules(
    recipe: Recipe,
    rank: int,
    device: torch.device,
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    loader: torch.utils.data.DataLoader,
    strategy: Strategy,
    payload: dict[str, Any] | None,
) -> Modules:
    """The model, wrapped as the strategy says (and, built on the meta device, given its weights),
    with the module evaluation calls."""
    shapes = resume.shapes_of(resume.checkpointed_state(model))  # the whole model's, before any split
    train_model = train_module(recipe, device, model, loss_fn, loader, strategy)
    materialize(recipe, rank, strategy, model, payload)
    eval_model = strategy.eval_model(model, train_model)
    held = strategy.held(model, train_model)
    return Modules(held, train_model, loss_fn, strategy, eval_model=eval_model, shapes=shapes)


def comm_hook(recipe: Recipe) -> Callable[..., Any] | None:
    """dist.ddp.comm_hook, resolved (a function DDP calls on each gradient bucket)."""
    if recipe.dist.ddp.comm_hook is None:
        return None
    return resolve_callable(recipe.dist.ddp.comm_hook, "dist.ddp.comm_hook")


def materialize(
    recipe: Recipe, rank: int, strategy: Strategy, model: torch.nn.Module, payload: dict[str, Any] | None
) -> None:
    """dist.fsdp.meta_init, once sharded: real shards, initialised, or a whole checkpoint's pieces."""
    if not strategy.meta_init:
        return
    rng.seed_everything(rng.derive_seed(recipe.seed, f"init rank {rank}"))  # each shard its own draws
    whole = checkpointer.whole_state(payload, "model") if payload is not None else None
    strategy.materialize(model, whole)
    rng.seed_everything(recipe.seed + strategy.dims.dp_rank(rank))  # the loop's streams, as without meta_init
