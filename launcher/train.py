"""One training run, start to end, in the order data flows:
recipe -> process group -> data -> model -> wrappers -> optimizer -> loop -> final weights."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from launcher import checkpoint, distributed, loop, parallel
from launcher.components import instantiate
from launcher.data import SeededDataset, ShardSampler, build_loader
from launcher.env import ClusterEnv
from launcher.errors import RecipeError
from launcher.metrics import ConsoleSink, JsonlSink, Metrics, log, setup_logging
from launcher.optim import build_optimizer, build_scheduler
from launcher.plan import Plan, build_plan
from launcher.recipe import Recipe

RUN_OUTPUTS = ("metrics.jsonl", "model.pt")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def check_run_dir(recipe: Recipe) -> Path:
    """Refuse to overwrite a previous run's outputs unless asked to."""
    run_dir = recipe.run_dir
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not recipe.run.overwrite:
        raise RecipeError("run.dir", f"{run_dir} already holds a run ({', '.join(found)}); choose another with "
                                     f"run.dir=..., or replace it with run.overwrite=true")
    return run_dir


def build_datasets(recipe: Recipe):
    train_set = instantiate(recipe.data.train, "data.train")
    val_set = instantiate(recipe.data.val, "data.val") if recipe.data.val is not None else None
    for key, ds in (("data.train", train_set), ("data.val", val_set)):
        if ds is not None and not hasattr(ds, "__len__"):
            raise RecipeError(key, f"{type(ds).__name__} has no len(); the launcher needs a map-style dataset")
    return train_set, val_set


def run(recipe: Recipe, env: ClusterEnv) -> loop.TrainState:
    setup_logging(env.rank)
    run_dir = check_run_dir(recipe)
    with distributed.session(env, recipe.dist.backend, recipe.dist.timeout_s) as sess:
        seed_everything(recipe.seed)
        train_set, val_set = build_datasets(recipe)
        plan = build_plan(recipe, env.world_size, len(train_set), len(val_set) if val_set is not None else None,
                          sess.backend, str(sess.device))
        model = instantiate(recipe.model, "model")
        parallel.check_segments(model, plan.segments)
        model.to(sess.device)
        # same initial weights on every rank (above); per-rank streams for dropout and the like (below)
        seed_everything(recipe.seed + env.rank)
        comm_hook = None
        if recipe.dist.ddp.comm_hook is not None:
            from launcher.components import resolve_callable
            comm_hook = resolve_callable(recipe.dist.ddp.comm_hook, "dist.ddp.comm_hook")
        train_model = parallel.wrap(model, segments=plan.segments, world_size=env.world_size,
                                    device=sess.device, ddp_cfg=recipe.dist.ddp, comm_hook=comm_hook)
        loss_fn = instantiate(recipe.loss, "loss")
        optimizer = build_optimizer(recipe, model)
        scheduler = build_scheduler(recipe, optimizer)
        scaler = torch.amp.GradScaler(sess.device.type) if recipe.train.precision == "fp16" else None
        train_sampler, train_loader, val_loader = _loaders(recipe, plan, env, sess, train_set, val_set)
        metrics = _metrics(recipe, plan, env, run_dir)
        trainer = loop.Trainer(recipe, plan, sess, model, train_model, loss_fn, optimizer, scheduler, scaler,
                               train_loader, train_sampler, val_loader, metrics)
        _print_plan(plan, env, model)
        try:
            state = loop.fit(trainer)
        finally:
            metrics.close()
        if env.is_rank0:
            checkpoint.save(model.state_dict(), run_dir / "model.pt")
            log.info(f"done: {state.stop_reason} after {state.step} steps; weights in {run_dir / 'model.pt'}")
    return state


def _loaders(recipe: Recipe, plan: Plan, env: ClusterEnv, sess, train_set, val_set):
    d = recipe.data
    pin = d.pin_memory if d.pin_memory is not None else sess.device.type == "cuda"
    common = dict(num_workers=d.num_workers, pin_memory=pin, prefetch_factor=d.prefetch_factor, seed=recipe.seed + env.rank)
    train_sampler = ShardSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=d.shuffle,
                                 seed=recipe.seed, drop_last=d.drop_last, stop=plan.shard_stop, with_epoch=True)
    train_loader = build_loader(SeededDataset(train_set, recipe.seed), train_sampler, d.batch_size, **common)
    val_loader = None
    if val_set is not None:
        val_sampler = ShardSampler(val_set, num_replicas=env.world_size, rank=env.rank, shuffle=False,
                                   seed=recipe.seed, drop_last=False)
        val_loader = build_loader(val_set, val_sampler, d.batch_size, **common)
    return train_sampler, train_loader, val_loader


def _metrics(recipe: Recipe, plan: Plan, env: ClusterEnv, run_dir: Path) -> Metrics:
    if not env.is_rank0:
        return Metrics([])
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(run_dir / "config.yaml", lambda f: f.write(recipe.to_yaml().encode()))
    return Metrics([JsonlSink(run_dir / "metrics.jsonl"), ConsoleSink(plan.total_steps)])


def _print_plan(plan: Plan, env: ClusterEnv, model: torch.nn.Module) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    rows = [("launched by", env.source), *plan.describe(), ("parameters", f"{n_params:,}")]
    width = max(len(k) for k, _ in rows)
    log.info("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
