"""One training run, assembled and run, in the order data flows: recipe -> process group -> run
directory -> data -> model (+ the checkpoint's weights) -> wrappers -> optimizer -> loop state (+ the
checkpoint's) -> Trainer -> loop -> final checkpoint and weights. Nothing here runs a step."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher import (
    batches,
    causes,
    data_fit,
    distributed,
    loop,
    parallel,
    resume,
    rng,
    setup,
    sharded_state,
    sharding,
    startup,
)
from launcher.builders import build_collate, build_datasets, build_loaders, train_samples
from launcher.checkpointer import Checkpointer
from launcher.cpu import step_time_estimate, threads_per_rank
from launcher.distributed import Session
from launcher.env import ClusterEnv
from launcher.errors import EXIT_FAILED, EXIT_USAGE, ArgumentError, Preempted, RecipeError, TrainingError, UserError
from launcher.heartbeat import Heartbeat
from launcher.logs import log, setup_logging
from launcher.loop_state import LogWindow, Trainer, TrainState
from launcher.metrics import (
    LoggerIds,
    Metrics,
    build_sinks,
    peak_flops,
)
from launcher.models import hf
from launcher.optim import build_optimizer, build_scheduler
from launcher.plan import Plan, build_plan, plan_warnings
from launcher.recipe import Recipe
from launcher.signals import Agreement, PreemptionFlag, parse_signal
from launcher.storage import save_torch

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
                timeout = TrainingError(
                    f"[rank {env.rank}] a collective timed out after dist.timeout_s={recipe.dist.timeout_s:g}s: {who}"
                )
                causes.record(timeout, EXIT_FAILED)
                raise timeout from None
            if isinstance(e, Exception) and not isinstance(e, Preempted) and not distributed.is_peer_failure(e):
                # now, while the peers still wait on this rank: once the process group goes, they
                # stop too, and the agent may report them before this rank's exception is recorded
                causes.record(e, EXIT_USAGE if isinstance(e, UserError) else EXIT_FAILED)
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
        train_samples(recipe, train_set, simulate or env.world_size),
        len(val_set) if val_set is not None else None,
        sess.backend,
        str(sess.device),
    )
    sharding.check(recipe, env.world_size, env.local_world_size)
    # FSDP needs a process group (torchrun starts one even for one rank); a plain single process, or
    # simulated ranks, trains the model whole
    sharded = recipe.dist.strategy != "ddp" and distributed.is_initialized() and not simulate
    model, payload = setup.model(recipe, env, sess, plan, resume_from, on_meta=sharded and recipe.dist.fsdp.meta_init)
    data_fit.check(model, {"data.train": train_set, "data.val": val_set}, build_collate(recipe))
    loss_fn = setup.loss(recipe)
    ranks = list(range(simulate)) if simulate else [env.rank]
    shards, val_loader = build_loaders(
        recipe,
        plan,
        train_set,
        val_set,
        ranks=ranks,
        rank=env.rank,
        world_size=env.world_size,
        device=sess.device,
        signals=preempt.signals,
    )
    train_model = setup.train_module(recipe, env, sess, model, loss_fn, shards[0][2], sharded)
    if sharded and recipe.dist.fsdp.meta_init:
        setup.materialize(recipe, env, sess, model, payload)
    # after sharding: FSDP replaces the parameters with their shards, which the optimizer then holds
    startup.mark("optimizer_start")
    optimizer = build_optimizer(recipe, model)
    startup.mark("optimizer")
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler(sess.device.type) if recipe.train.precision == "fp16" else None

    # the loop's state: fresh, or restored from the checkpoint
    state, window, logger_ids = (
        TrainState(),
        LogWindow.for_run(recipe.log.every_n_steps, plan.total_steps, sess.device),
        LoggerIds(),
    )
    saved = resume.saved_objects(
        model, optimizer, scheduler, scaler, state, window, sess, logger_ids, recipe.train.on_nonfinite, sharded
    )
    if payload is not None and resume_from is not None:
        resume.restore(payload, resume_from, saved, recipe, plan, sess)
    rank_rng = rng.streams_of_ranks(recipe.seed, ranks) if simulate else None
    flops_per_sample = _attr("flops_per_sample", model, train_set)
    counting = batches.Counting.of(recipe.train.loss_mean_over, model, model_computes_loss=loss_fn is None)
    extra = [("threads per rank", threads), ("loss: the mean over", counting.describe())]
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
        metrics = build_sinks(
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
    t = Trainer(
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
            recipe.checkpoint_dir,
            recipe.checkpoint.keep_last,
            is_writer=env.is_main,
            group=sess.control,
            sharded=frozenset({"model", "optimizer"}) if sharded else frozenset(),
        ),
        preempt=preempt,
        agreement=Agreement(sess.control if env.world_size > 1 else None),
        profiler=_profiler(recipe, env, sess.device),
        heartbeat=Heartbeat() if env.is_main else None,
        tokens_per_sample=_attr("tokens_per_sample", model, train_set),
        flops_per_sample=flops_per_sample,
        peak_flops=peak_flops(sess.device, recipe.train.precision),
        rank_rng=rank_rng,
        eval_model=parallel.eval_model(model, train_model) if sharded else None,
        sharded=sharded,
        counting=counting,
    )
    return _fit(t, env)


def _fit(t: Trainer, env: ClusterEnv) -> TrainState:
    """Train, save the final checkpoint and weights, and say how the run ended."""
    recipe = t.recipe
    ok = False
    try:
        try:
            state = loop.fit(t)
        except ArgumentError as e:  # a data source's complaint about what it read (a bad row of a stream)
            raise _data_error(t, e) from None
        if env.is_main and "first_step" in startup.marks:
            _write_startup(recipe.layout.startup)
        # final (or preemption) checkpoint, checked before it is written: the run can be resumed or extended
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
    # CPU tensors: loadable on any machine without map_location (sharded: every rank gathers)
    weights = sharded_state.full_model_state(t.model, sharded=t.sharded)
    if env.is_main:
        save_torch(weights, recipe.layout.weights)
        where = str(recipe.layout.weights)
        if hf.is_pretrained(t.model):
            hf.export(t.model, weights, recipe.layout.hf_model)
            where += f" and {recipe.layout.hf_model} (from_pretrained)"
        log.info(f"done: {state.stop_reason} after {state.step} steps; weights in {where}")
    return state


def _data_error(t: Trainer, e: ArgumentError) -> RecipeError:
    """A bad row met while training, as one line naming it. One process alone saves a checkpoint
    of the steps done first (no peer has to agree); ranks may meet the row at different steps, so
    there the last periodic checkpoint is the resume point."""
    saved = ""
    if t.session.world_size == 1 and t.state.step > t.state.last_checkpoint_step:
        resume.save_checkpoint(t)  # at a step boundary: the window the row cut short is not in it
        saved = f" (the {t.state.step} steps before it are saved: fix the row and run the same command)"
    return RecipeError(f"data.train.{e.argument}" if e.argument else "data.train", f"{e}{saved}")


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


def _write_startup(path: Path) -> None:
    report = startup.report()
    path.write_text(json.dumps(report, indent=1) + "\n")
    if "launcher_s" in report:
        log.info(
            f"first optimizer step {report['first_step_s']:.2f} s after process start: import torch "
            f"{report['torch_s']:.2f} s, model {report['model_build_s']:.2f} s, optimizer "
            f"{report['optimizer_build_s']:.2f} s, the rest {report['launcher_s']:.2f} s"
        )


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
