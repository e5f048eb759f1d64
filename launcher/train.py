"""One training run, assembled and run, in the order data flows: recipe -> process group -> run
directory -> data -> model (+ the checkpoint's weights) -> wrappers -> optimizer -> loop state (+ the
checkpoint's) -> Trainer -> loop -> final checkpoint and weights. Nothing here runs a step."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from launcher import distributed, loop, parallel, resume, rng, startup
from launcher.builders import build_datasets, build_model
from launcher.checkpointer import Checkpointer
from launcher.components import instantiate, resolve_callable
from launcher.cpu import step_time_estimate, threads_per_rank
from launcher.data import SeededDataset, ShardSampler, build_loader
from launcher.distributed import Session
from launcher.env import ClusterEnv
from launcher.errors import Preempted, RecipeError, TrainingError
from launcher.logs import log, setup_logging
from launcher.loop_state import LogWindow, TrainState
from launcher.memory import state_checkpoint_bytes
from launcher.metrics import (
    ConsoleSink,
    JsonlSink,
    LoggerIds,
    Metrics,
    ProgressSink,
    TensorBoardSink,
    peak_flops,
    read_metrics,
)
from launcher.optim import build_optimizer, build_scheduler
from launcher.plan import Plan, build_plan, plan_warnings
from launcher.recipe import Recipe
from launcher.rng import capture_rng_state
from launcher.signals import Agreement, PreemptionFlag, parse_signal
from launcher.storage import atomic_write, save_torch

if TYPE_CHECKING:
    from launcher.profiling import StepProfiler


def run(recipe: Recipe, env: ClusterEnv, simulate: int | None = None) -> TrainState:
    """Train. `simulate=N`: one process reproduces the arithmetic of an N-rank run (launcher debug)."""
    setup_logging(env.rank)
    threads, why = threads_per_rank(env.local_world_size)
    torch.set_num_threads(threads)  # N ranks x all cores each would oversubscribe the CPU
    if (
        env.is_main
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
    ):
        log.warning(
            "torchrun restarts can fail to reconnect when the workers share the rendezvous store "
            "(pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
        )
    signals = [parse_signal("SIGTERM"), parse_signal(recipe.checkpoint.preempt_signal), signal.SIGINT]
    # installed first: a preemption signal during start-up is remembered, not fatal
    with (
        PreemptionFlag(list(dict.fromkeys(signals))) as preempt,
        distributed.session(env, recipe.dist.backend, recipe.dist.timeout_s) as sess,
    ):
        try:
            return _train(recipe, env, sess, preempt, simulate, threads=f"{threads} ({why})")
        except BaseException as e:
            # the traceback pins the frames that hold DDP; free them so it goes before the process group
            traceback.clear_frames(e.__traceback__)
            if env.world_size > 1 and distributed.is_timeout(e):
                who = distributed.missing_ranks(sess.control, env.rank, min(recipe.dist.timeout_s, 30.0))
                raise TrainingError(
                    f"[rank {env.rank}] a collective timed out after dist.timeout_s={recipe.dist.timeout_s:g}s: {who}"
                ) from None
            raise
        finally:
            # DDP's reducer (and any Python comm hook it holds) must be destroyed before the
            # process group: left to interpreter exit, its destructor can abort the process
            gc.collect()


def _train(
    recipe: Recipe, env: ClusterEnv, sess: Session, preempt: PreemptionFlag, simulate: int | None, threads: str
) -> TrainState:
    # the main process writes the run directory: it holds the lock until it exits, however it exits;
    # the others check it too, so that every rank refuses a directory that cannot be written alike
    if not env.is_main:
        recipe.layout.preflight()
    with recipe.layout.locked() if env.is_main else contextlib.nullcontext():
        return _train_locked(recipe, env, sess, preempt, simulate, threads)


def _train_locked(
    recipe: Recipe, env: ClusterEnv, sess: Session, preempt: PreemptionFlag, simulate: int | None, threads: str
) -> TrainState:
    layout = recipe.layout
    resume_from = layout.prepare(recipe.checkpoint.resume, recipe.run.overwrite, env.restart_count, act=env.is_main)
    train_set, val_set = build_datasets(recipe)
    plan = build_plan(
        recipe,
        simulate or env.world_size,
        len(train_set),
        len(val_set) if val_set is not None else None,
        sess.backend,
        str(sess.device),
    )
    startup.mark("model_start")
    model = build_model(recipe)
    startup.mark("model")
    if env.is_main and (space := layout.space_warning(state_checkpoint_bytes(model))):
        log.warning(space)
    ac = recipe.train.activation_checkpointing
    parallel.check_segments(model, ac.segments if isinstance(ac.segments, int) else 0, ac.head_chunks)
    payload = resume.load_for_resume(resume_from, model, recipe, plan) if resume_from else None
    model.to(sess.device)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    # same initial weights on every rank (above); per-rank streams for dropout and the like (below)
    rng.seed_everything(recipe.seed + env.rank)
    loss_fn = instantiate(recipe.loss, "loss")
    if not callable(loss_fn):
        raise RecipeError(
            "loss._component_",
            f"{recipe.loss['_component_']} built a {type(loss_fn).__name__}, which "
            "cannot be called; name a loss module or function",
        )
    startup.mark("optimizer_start")
    optimizer = build_optimizer(recipe, model)
    startup.mark("optimizer")
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler(sess.device.type) if recipe.train.precision == "fp16" else None
    ranks = list(range(simulate)) if simulate else [env.rank]
    shards, val_loader = _loaders(recipe, plan, env, sess, train_set, val_set, preempt.signals, ranks)
    segments, head_chunks = _activation_checkpointing(recipe, model, loss_fn, shards[0][2], sess.device)
    comm_hook = None
    if recipe.dist.ddp.comm_hook is not None:
        comm_hook = resolve_callable(recipe.dist.ddp.comm_hook, "dist.ddp.comm_hook")
    train_model = parallel.wrap(
        model,
        loss_fn,
        segments=segments,
        head_chunks=head_chunks,
        world_size=env.world_size,
        device=sess.device,
        ddp_cfg=recipe.dist.ddp,
        comm_hook=comm_hook,
        compile_=recipe.train.compile,
    )

    # the loop's state: fresh, or restored from the checkpoint
    state, window, logger_ids = (
        TrainState(),
        LogWindow.for_run(recipe.log.every_n_steps, plan.total_steps, sess.device),
        LoggerIds(),
    )
    saved = resume.saved_objects(model, optimizer, scheduler, scaler, state, window, sess, logger_ids)
    if payload is not None and resume_from is not None:
        resume.restore(payload, resume_from, saved, recipe, plan, sess)
    rank_rng = _simulated_rank_streams(recipe.seed, ranks) if simulate else None
    flops_per_sample = _attr("flops_per_sample", model, train_set)
    extra = [("threads per rank", threads)]
    if env.is_main and sess.device.type == "cpu" and flops_per_sample:
        extra.append(
            ("step time (estimate)", step_time_estimate(flops_per_sample, plan.global_batch, recipe.train.precision))
        )
    _print_plan(plan, env, model, simulate, extra)
    if env.is_main:
        for warning in plan_warnings(recipe, plan, sess.device.type):
            log.warning(warning)
    metrics = Metrics([])
    if env.is_main:
        metrics = _metrics(
            recipe,
            plan,
            state.step,
            logger_ids,
            resumed=resume_from is not None,
            continuing=resume_from is not None or env.restart_count > 0,
        )
    if payload is not None:
        resume.restore_rng(payload, saved)  # last: these are the streams the loop continues
        del payload
    t = loop.Trainer(
        recipe,
        plan,
        sess,
        model,
        train_model,
        loss_fn,
        optimizer,
        scheduler,
        scaler,
        shards,
        val_loader,
        log=metrics,
        state=state,
        window=window,
        saved=saved,
        checkpointer=Checkpointer(
            recipe.checkpoint_dir, recipe.checkpoint.keep_last, is_writer=env.is_main, group=sess.control
        ),
        preempt=preempt,
        agreement=Agreement(sess.control if env.world_size > 1 else None),
        profiler=_profiler(recipe, env, sess.device),
        heartbeat=loop.Heartbeat() if env.is_main else None,
        tokens_per_sample=_attr("tokens_per_sample", model, train_set),
        flops_per_sample=flops_per_sample,
        peak_flops=peak_flops(sess.device, recipe.train.precision),
        rank_rng=rank_rng,
    )
    return _fit(t, env)


def _fit(t: loop.Trainer, env: ClusterEnv) -> TrainState:
    """Train, save the final checkpoint and weights, and say how the run ended."""
    recipe = t.recipe
    ok = False
    try:
        state = loop.fit(t)
        if env.is_main and "first_step" in startup.marks:
            _write_startup(recipe.layout.startup)
        resume.check_finite(t)
        # final (or preemption) checkpoint: the run can be resumed or extended
        resume.save_checkpoint(t)
        ok = True
    finally:
        stopped = ok and t.stop_signal is not None
        for sink in t.log.sinks:
            if stopped and hasattr(sink, "preempting"):
                sink.preempting()
        t.log.close(ok and not stopped)
    if stopped:
        if t.stop_signal == signal.SIGINT:  # Ctrl-C: the user stops; nothing to requeue
            raise Preempted(
                f"{state.stop_reason} at step {state.step}: checkpoint saved; run the same command to continue",
                128 + signal.SIGINT,
            )
        code = recipe.checkpoint.requeue_exit_code
        raise Preempted(
            f"{state.stop_reason} at step {state.step}: checkpoint saved, exiting with {code} to be requeued", code
        )
    if env.is_main:
        # CPU tensors: loadable on any machine without map_location
        save_torch({k: v.detach().cpu() for k, v in t.model.state_dict().items()}, recipe.layout.weights)
        log.info(f"done: {state.stop_reason} after {state.step} steps; weights in {recipe.layout.weights}")
    return state


def _simulated_rank_streams(seed: int, ranks: list[int]) -> dict[int, dict[str, Any]]:
    """Each simulated rank starts with the streams that rank would have."""
    streams = {}
    for r in ranks:
        rng.seed_everything(seed + r)
        streams[r] = capture_rng_state()
    return streams


def _profiler(recipe: Recipe, env: ClusterEnv, device: torch.device) -> StepProfiler | None:
    cfg = recipe.log.profile
    if cfg is None or env.rank not in cfg.ranks:
        return None
    from launcher.profiling import StepProfiler

    return StepProfiler(
        recipe.run_dir / "profile",
        f"rank{env.rank}",
        device,
        cfg.start_step,
        cfg.steps,
        memory=cfg.memory,
        with_stack=cfg.with_stack,
    )


def _loaders(
    recipe: Recipe,
    plan: Plan,
    env: ClusterEnv,
    sess: Session,
    train_set: Dataset,
    val_set: Dataset | None,
    signals: list[signal.Signals],
    ranks: list[int],
) -> tuple[list[tuple[int, ShardSampler, DataLoader]], DataLoader | None]:
    """One training shard per rank this process trains (its own, or each simulated rank's)."""
    d = recipe.data
    pin = d.pin_memory if d.pin_memory is not None else sess.device.type == "cuda"
    loader = functools.partial(
        build_loader,
        batch_size=plan.micro_batch,
        num_workers=d.num_workers,
        pin_memory=pin,
        prefetch_factor=d.prefetch_factor,
        ignore_signals=tuple(signals),
    )
    seeded = SeededDataset(train_set, recipe.seed)
    shards = []
    for rank in ranks:
        sampler = ShardSampler(
            train_set,
            num_replicas=plan.world_size,
            rank=rank,
            shuffle=d.shuffle,
            seed=recipe.seed if d.seed is None else d.seed,
            drop_last=d.drop_last,
            stop=plan.shard_stop,
            with_epoch=True,
        )
        shards.append((rank, sampler, loader(seeded, sampler, seed=recipe.seed + rank)))
    val_loader = None
    if val_set is not None:  # evaluation sums over samples: a simulated run evaluates unsharded
        val_sampler = ShardSampler(
            val_set, num_replicas=env.world_size, rank=env.rank, shuffle=False, seed=recipe.seed, drop_last=False
        )
        val_loader = loader(val_set, val_sampler, seed=recipe.seed + env.rank)
    return shards, val_loader


def _activation_checkpointing(
    recipe: Recipe,
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    loader: DataLoader,
    device: torch.device,
) -> tuple[int, int]:
    """Activation checkpointing's (segments, head_chunks): from the recipe, or probed (segments: auto)."""
    ac = recipe.train.activation_checkpointing
    if ac.segments != "auto":
        return ac.segments, ac.head_chunks
    from launcher import memory
    from launcher.data import to_device

    # Adam-like optimizers will hold two tensors per parameter once they step
    state_gib = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    batch = to_device(next(iter(loader)), device)
    segments, chunks, _ = memory.choose(
        model,
        loss_fn,
        batch,
        device,
        lambda: loop.autocast(recipe.train.precision, device),
        ac.max_memory_gib,
        state_gib,
    )
    return segments, chunks


def _write_startup(path: Path) -> None:
    report = startup.report()
    path.write_text(json.dumps(report, indent=1) + "\n")
    if "launcher_s" in report:
        log.info(
            f"first optimizer step {report['first_step_s']:.2f} s after process start: import torch "
            f"{report['torch_s']:.2f} s, model {report['model_build_s']:.2f} s, optimizer "
            f"{report['optimizer_build_s']:.2f} s, the rest {report['launcher_s']:.2f} s"
        )


def _metrics(recipe: Recipe, plan: Plan, step: int, logger_ids: LoggerIds, resumed: bool, continuing: bool) -> Metrics:
    """The main process's sinks. `resumed`: from a checkpoint (at `step`); `continuing`: the same run
    (resumed or restarted)."""
    layout = recipe.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.config, lambda f: f.write(recipe.to_yaml().encode()))
    path = layout.metrics
    if resumed and path.exists():
        # continue the history: rows past the checkpoint were trained again and are logged again;
        # a row torn by a crash mid-write is dropped (and rewritten when its step is trained again)
        rows, torn = read_metrics(path)
        if torn:
            log.warning(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
        kept = [json.dumps(r, allow_nan=True) for r in rows if r.get("step", 0) <= step]
        atomic_write(path, lambda f: f.write("".join(r + "\n" for r in kept).encode()))
    sinks: list[Any] = [JsonlSink(path, append=resumed)]
    progress = recipe.log.progress
    if progress == "bar" or (progress == "auto" and sys.stdout.isatty()):
        sinks.append(ProgressSink(plan.total_steps, step))
    else:
        sinks.append(ConsoleSink(plan.total_steps))
    if recipe.log.tensorboard:
        sinks.append(TensorBoardSink(layout.root / "tensorboard", step))
    if recipe.log.wandb is not None:
        from launcher import wandb_log

        run_id = wandb_log.run_id(layout.root, logger_ids.get("wandb"), continuing)
        logger_ids["wandb"] = run_id
        sinks.append(wandb_log.WandbSink(recipe, layout.root, run_id))
    return Metrics(sinks)


def _attr(name: str, *objects: object) -> float | None:
    """A per-sample figure the model or the dataset declares (GPT: tokens_per_sample, flops_per_sample)."""
    for obj in objects:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return value
    return None


def _print_plan(
    plan: Plan, env: ClusterEnv, model: torch.nn.Module, simulate: int | None, extra: list[tuple[str, str]]
) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    launched = env.source + (f" (restart {env.restart_count})" if env.restart_count else "")
    if simulate:
        launched += f", simulating {simulate} ranks in this one process"
    rows = [("launched by", launched), *plan.describe(), *extra, ("parameters", f"{n_params:,}")]
    width = max(len(k) for k, _ in rows)
    log.info("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
