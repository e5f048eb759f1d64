"""The model side of a run: build it (or its meta-device skeleton), put a checkpoint's weights in,
wrap it for the step (activation checkpointing, DDP or FSDP, torch.compile), and give a
meta-device model its shards."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher import memory, parallel, resume, rng, sharded_state, sharding, startup
from launcher.batches import LossFn
from launcher.builders import build_model
from launcher.components import instantiate, resolve_callable
from launcher.distributed import Session
from launcher.env import ClusterEnv
from launcher.errors import RecipeError
from launcher.logs import log
from launcher.memory import state_checkpoint_bytes
from launcher.plan import Plan
from launcher.precision import autocast
from launcher.recipe import Recipe


def model(
    recipe: Recipe, env: ClusterEnv, sess: Session, plan: Plan, resume_from: Path | None, on_meta: bool
) -> tuple[torch.nn.Module, dict | None]:
    """The model, with a checkpoint's weights (and that checkpoint, checked, for the rest). `on_meta`
    (dist.fsdp.meta_init): no weights until each rank's shards exist (sharding.materialize)."""
    if recipe.dist.strategy != "ddp":
        # FSDP imports it (~100 MB) on first use: imported before the mark, it is not counted as the model's
        # memory (importlib: an `import torch._dynamo` here would make `torch` a local name of this function)
        importlib.import_module("torch._dynamo")
    startup.mark("model_start")
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_model(recipe)
    startup.mark("model")
    if env.is_main and (space := recipe.layout.space_warning(state_checkpoint_bytes(model))):
        log.warning(space)
    ac = recipe.train.activation_checkpointing
    parallel.check_segments(model, ac.segments if isinstance(ac.segments, int) else 0, ac.head_chunks)
    if ac.modules:  # before sharding: FSDP's hooks then run around each recomputed block
        parallel.checkpoint_modules(model, ac.modules)
    if recipe.dist.strategy != "ddp":
        sharding.units(model, recipe.dist.fsdp.units)  # a wrong class name fails at any world size
    payload = resume.load_for_resume(resume_from, model, recipe, plan, not on_meta) if resume_from else None
    if not on_meta:
        model.to(sess.device)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    # same initial weights on every rank (above); per-rank streams for dropout and the like (below)
    rng.seed_everything(recipe.seed + env.rank)
    return model, payload


def loss(recipe: Recipe) -> LossFn | None:
    """The loss component, or None: the model computes its own (launcher/batches.py)."""
    if recipe.loss is None:
        return None
    loss_fn = instantiate(recipe.loss, "loss")
    if not callable(loss_fn):
        raise RecipeError(
            "loss._component_",
            f"{recipe.loss['_component_']} built a {type(loss_fn).__name__}, which "
            "cannot be called; name a loss module or function",
        )
    return loss_fn


def train_module(
    recipe: Recipe,
    env: ClusterEnv,
    sess: Session,
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    loader: torch.utils.data.DataLoader,
    sharded: bool,
) -> torch.nn.Module:
    """What the step calls: activation checkpointing, then DDP or FSDP, then torch.compile."""
    ac = recipe.train.activation_checkpointing
    segments, head_chunks = memory.resolve_segments(
        ac, model, loss_fn, loader, sess.device, lambda: autocast(recipe.train.precision, sess.device)
    )
    comm_hook = None
    if recipe.dist.ddp.comm_hook is not None:
        comm_hook = resolve_callable(recipe.dist.ddp.comm_hook, "dist.ddp.comm_hook")
    return parallel.wrap(
        model,
        loss_fn,
        segments=segments,
        head_chunks=head_chunks,
        world_size=env.world_size,
        device=sess.device,
        ddp_cfg=recipe.dist.ddp,
        comm_hook=comm_hook,
        compile_=recipe.train.compile,
        shard=sharder(recipe, env, sess, model, head_chunks) if sharded else None,
    )


def sharder(
    recipe: Recipe, env: ClusterEnv, sess: Session, model: torch.nn.Module, head_chunks: int
) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """dist.strategy fsdp/hsdp: how parallel.wrap shards the TrainModule around `model`."""
    cfg = recipe.dist.fsdp
    mesh = sharding.build_mesh(recipe.dist.strategy, cfg, env.world_size, env.local_world_size, sess.device)
    return lambda root: sharding.shard(root, model, cfg, mesh, recipe.train.precision, head_chunks)


def materialize(
    recipe: Recipe, env: ClusterEnv, sess: Session, model: torch.nn.Module, payload: dict[str, Any] | None
) -> None:
    """dist.fsdp.meta_init, once sharded: real shards, initialised, or a whole checkpoint's pieces."""
    rng.seed_everything(rng.derive_seed(recipe.seed, f"init rank {env.rank}"))  # each shard its own draws
    sharding.materialize(model, sess.device)
    if payload is not None and not payload.get("sharded"):  # a whole checkpoint: every rank keeps its shards
        sharded_state.load_whole_model(model, payload["model"])
    rng.seed_everything(recipe.seed + env.rank)  # the streams the loop starts from, as without meta_init
