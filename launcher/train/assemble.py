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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher import rng
from launcher.checkpoint import step_dirs
from launcher.checkpoint.background import BackgroundWrite
from launcher.checkpoint.checkpointer import Checkpointer
from launcher.cluster import causes, distributed, hang
from launcher.cluster.cpu import step_time_estimate, threads_per_rank
from launcher.cluster.distributed import Session
from launcher.cluster.env import ClusterEnv
from launcher.cluster.signals import Agreement, PreemptionFlag, parse_signal
from launcher.data import batches, fit, streaming
from launcher.data.builders import build_collate, build_datasets, build_loaders, build_model, train_samples
from launcher.data.plan import Plan, build_plan, plan_warnings
from launcher.errors import EXIT_FAILED, EXIT_USAGE, DataRowError, Preempted, RecipeError, TrainingError, UserError
from launcher.models import flops, hf
from launcher.observe import startup
from launcher.observe.heartbeat import Heartbeat, phase
from launcher.observe.logs import log, route_library_bars, setup_logging, shows_bars
from launcher.observe.metrics import (
    LoggerIds,
    Metrics,
    build_sinks,
    peak_flops,
)
from launcher.parallel import context_plan, memory, pipelined, sharding
from launcher.parallel.choose import build_strategy
from launcher.parallel.dims import dims_for, node_warning
from launcher.parallel.strategy import Strategy
from launcher.recipe.schema import Recipe
from launcher.storage import atomic_write, save_torch
from launcher.train import loop, resume, setup
from launcher.train.loop_state import Control, Data, LogWindow, Modules, Observers, Optimization, Trainer, TrainState
from launcher.train.optim import build_optimization

if TYPE_CHECKING:
    from launcher.observe.profiling import StepProfiler


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
        hang.reporting(
            recipe.run_dir / "hang", env.rank, env.world_size, on_signal=hang.REPORT_SIGNAL not in signals
        ) as report,
        distributed.session(env, recipe.dist.backend, recipe.dist.timeout_s) as sess,
    ):
        try:
            return _train(recipe, env, sess, preempt, simulate, threads=f"{threads} ({why})")
        except BaseException as e:
            # the traceback pins the frames that hold DDP; free them so it goes before the process group
            traceback.clear_frames(e.__traceback__)
            if env.world_size > 1 and distributed.is_timeout(e):
                if report is not None:  # where this rank waited, and every rank's report (the parent asks them)
                    report.timed_out(e)
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
    # the main process says what it is doing when a start-up phase takes long (then each slow step)
    heartbeat = Heartbeat() if env.is_main else None
    try:
        with recipe.layout.locked() if env.is_main else contextlib.nullcontext():
            return _train_locked(recipe, env, sess, preempt, simulate, threads, heartbeat)
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _train_locked(
    recipe: Recipe,
    env: ClusterEnv,
    sess: Session,
    preempt: PreemptionFlag,
    simulate: int | None,
    threads: str,
    heartbeat: Heartbeat | None,
) -> TrainState:
    # every rank hashes its share of a checkpoint's files (not all of them), and all agree on it
    check = step_dirs.verify_together()
    resume_from = recipe.layout.prepare(
        recipe.checkpoint.resume, recipe.run.overwrite, env.restart_count, act=env.is_main, check=check
    )
    route_library_bars(env.is_main and shows_bars(recipe.log.progress))
    with phase(heartbeat, "reading the data (data.train, data.val)"):
        train_set, val_set = build_datasets(recipe)
    strategy = _strategy(recipe, env, sess, simulate)
    plan = build_plan(
        recipe,
        strategy.dims,
        train_samples(recipe, train_set, strategy.dims.dp_size),
        len(val_set) if val_set is not None else None,
        sess.backend,
        str(sess.device),
        streamed=streaming.is_stream(train_set),
    )
    model, payload, base = setup.model(recipe, env, sess, plan, resume_from, strategy, heartbeat=heartbeat)
    fit.check(model, {"data.train": train_set, "data.val": val_set}, build_collate(recipe))
    loss_fn = setup.loss(recipe)
    data = _data(recipe, plan, train_set, val_set, strategy, env.rank, sess, preempt, simulate, model, loss_fn)
    with phase(heartbeat, f"wrapping the model ({strategy.describe})"):
        modules = setup.modules(recipe, env.rank, sess.device, model, loss_fn, data.shards[0][2], strategy, payload)
    # after sharding: FSDP replaces the parameters with their shards, which the optimizer then holds
    optim = build_optimization(recipe, modules.model, sess.device)

    # the loop's state: fresh, or restored from the checkpoint
    state, window, logger_ids = (
        TrainState(),
        LogWindow.for_run(recipe.log.every_n_steps, plan.total_steps, sess.device),
        LoggerIds(),
    )
    control = _control(recipe, env, sess, preempt, modules, optim, base, state, window, logger_ids)
    if payload is not None and resume_from is not None:
        with phase(heartbeat, f"restoring {resume_from}"):
            resume.restore(payload, resume_from, control.saved, recipe, plan, sess)
    observers = _observers(recipe, env, sess, data, model, train_set, val_set, simulate, threads, heartbeat)
    if env.is_main:
        observers.log = build_sinks(
            recipe,
            plan,
            state.step,
            logger_ids,
            resumed=resume_from is not None,
            continuing=resume_from is not None or env.restart_count > 0,
        )
    if payload is not None:
        resume.restore_rng(payload, control.saved)  # last: these are the streams the loop continues
        del payload
    t = Trainer(recipe, sess, state, window, modules, optim, data, observers, control)
    # a tokenizer the data was read with goes beside a transformers model's export
    return _fit(t, env, getattr(getattr(train_set, "tokenizer", None), "save_into", None))


def _strategy(recipe: Recipe, env: ClusterEnv, sess: Session, simulate: int | None) -> Strategy:
    """The strategy over the recipe's parallel dimensions, built once for this process. FSDP needs a
    process group (torchrun starts one even for one rank); a plain single process, or simulated
    ranks, trains the model whole."""
    sharding.check(recipe)
    pipelined.check(recipe)
    context_plan.check(recipe)
    strategy = build_strategy(
        recipe,
        dims_for(recipe, simulate or env.world_size, env.local_world_size),
        sess.device,
        has_process_group=distributed.is_initialized() and not simulate,
        comm_hook=setup.comm_hook(recipe),
    )
    if env.is_main and (warning := node_warning(strategy.dims, env.local_world_size)):
        log.warning(warning)
    return strategy


def _data(
    recipe: Recipe,
    plan: Plan,
    train_set: Any,
    val_set: Any,
    strategy: Strategy,
    rank: int,
    sess: Session,
    preempt: PreemptionFlag,
    simulate: int | None,
    model: torch.nn.Module,
    loss_fn: batches.LossFn | None,
) -> Data:
    """The loaders of the data-parallel ranks this process trains (its own, or every simulated one),
    and what the loss's mean is over."""
    dims = strategy.dims
    dp_rank = dims.dp_rank(rank)
    trained = list(range(dims.dp_size)) if simulate else [dp_rank]
    shards, val_loader = build_loaders(
        recipe,
        plan,
        train_set,
        val_set,
        ranks=trained,
        rank=dp_rank,
        world_size=dims.dp_size if not simulate else 1,
        device=sess.device,
        signals=preempt.signals,
    )
    counting = batches.Counting.of(recipe.train.loss_mean_over, model, model_computes_loss=loss_fn is None)
    rank_rng = rng.streams_of_ranks(recipe.seed, trained) if simulate else None
    return Data(plan, shards, val_loader, counting, rank_rng)


def _control(
    recipe: Recipe,
    env: ClusterEnv,
    sess: Session,
    preempt: PreemptionFlag,
    modules: Modules,
    optim: Optimization,
    base: str | None,
    state: TrainState,
    window: LogWindow,
    logger_ids: LoggerIds,
) -> Control:
    """What a checkpoint holds and who writes it; the stop signals and the ranks' agreement on them."""
    strategy = modules.strategy
    model_state, optimizer_state = strategy.checkpointed(modules.model, optim.optimizer, base)
    saved = resume.saved_objects(
        model_state,
        optimizer_state,
        optim.scheduler,
        optim.scaler,
        state,
        window,
        sess,
        logger_ids,
        recipe.train.on_nonfinite,
        loss_ranks=strategy.loss_ranks(),
    )
    checkpointer = Checkpointer(
        recipe.checkpoint_dir,
        recipe.checkpoint.keep_last,
        is_writer=env.is_main,
        group=sess.control,
        sharded=strategy.shards_in_checkpoint,
        background=_background_writes(recipe),
        owner=recipe.layout.owner,
    )
    return Control(checkpointer, saved, preempt, Agreement(sess.control if env.world_size > 1 else None))


def _observers(
    recipe: Recipe,
    env: ClusterEnv,
    sess: Session,
    data: Data,
    model: torch.nn.Module,
    train_set: Any,
    val_set: Any,
    simulate: int | None,
    threads: str,
    heartbeat: Heartbeat | None,
) -> Observers:
    """The profiler, the heartbeat and the figures the log rows need; the plan printed, with its
    warnings. The metrics sinks come last (the main process's, once the checkpoint is restored)."""
    plan = data.plan
    flops_per_sample = flops.flops_per_sample(model, train_set)  # the GPT's own, a transformers model's estimate
    extra = [("threads per rank", threads), ("loss: the mean over", data.counting.describe())]
    estimate = None
    if env.is_main and sess.device.type == "cpu" and flops_per_sample:
        # simulated ranks run one after another in this process
        ranks_at_once = 1 if simulate else env.world_size
        estimate = step_time_estimate(
            flops_per_sample, plan.global_batch, ranks_at_once, torch.get_num_threads(), recipe.train.precision
        )
        extra.append(("step time (estimate)", estimate.describe()))
    _print_plan(plan, env, model, simulate, extra)
    if env.is_main:
        for warning in plan_warnings(recipe, plan, sess.device.type) + fit.notes(
            {"data.train": train_set, "data.val": val_set}
        ):
            log.warning(warning)
    return Observers(
        Metrics([]),
        profiler=_profiler(recipe, env, sess.device),
        heartbeat=heartbeat,
        # padded samples are shorter than the model's context: their tokens are counted, not assumed
        tokens_per_sample=_attr(
            "tokens_per_sample", *([] if getattr(train_set, "needs_padding", False) else [model]), train_set
        ),
        flops_per_sample=flops_per_sample,
        step_time_estimate=estimate,
        peak_flops=peak_flops(sess.device, recipe.train.precision),
    )


def _fit(t: Trainer, env: ClusterEnv, save_tokenizer: Callable[[Path], None] | None = None) -> TrainState:
    """Train, save the final checkpoint and weights, and say how the run ended."""
    recipe = t.recipe
    ok = False
    try:
        try:
            state = loop.fit(t)
        except DataRowError as e:  # a data source's complaint about what it read (a bad row of a stream)
            raise _data_error(t, e) from None
        if env.is_main and "first_step" in startup.marks:
            _write_startup(recipe.layout.startup)
        # final (or preemption) checkpoint, checked before it is written: the run can be resumed or extended
        resume.save_checkpoint(t)
        ok = True
    finally:
        if not ok:  # a periodic checkpoint being written may still finish (else the one before it stands)
            t.control.checkpointer.settle(timeout_s=60.0)
        stopped = ok and t.control.stop_signal is not None
        for sink in t.observe.log.sinks:
            if stopped and hasattr(sink, "preempting"):
                sink.preempting()
        t.observe.log.close(ok and not stopped)
    if stopped:
        if t.control.stop_signal == signal.SIGINT:  # Ctrl-C: the user stops; nothing to requeue
            raise Preempted(
                f"{state.stop_reason} at step {state.step}: checkpoint saved; run the same command to continue",
                128 + signal.SIGINT,
            )
        code = recipe.checkpoint.requeue_exit_code
        raise Preempted(
            f"{state.stop_reason} at step {state.step}: checkpoint saved, exiting with {code} to be requeued", code
        )
    # CPU tensors: loadable on any machine without map_location (sharded: every rank gathers)
    weights = t.modules.strategy.full_state(t.modules.model)
    if env.is_main:
        save_torch(weights, recipe.layout.weights)
        where = str(recipe.layout.weights)
        model = t.modules.model
        if not t.modules.strategy.holds_whole_model:  # a pipeline stage's: the whole one, built again
            with torch.device("cpu"):
                model = build_model(recipe)
            model.load_state_dict(weights)
        if hf.is_pretrained(model):
            hf.export(model, weights, recipe.layout.hf_model, save_tokenizer)
            where += f" and {recipe.layout.hf_model} (from_pretrained)"
            if hf.is_adapted(model):  # hf/ holds the adapter; the merged model beside it
                whole = hf.merged(model, weights)
                hf.export(whole, whole.state_dict(), recipe.layout.hf_merged, save_tokenizer)
                where += f", the adapter merged in {recipe.layout.hf_merged}"
        log.info(f"done: {state.stop_reason} after {state.step} steps; weights in {where}")
    return state


def _data_error(t: Trainer, e: DataRowError) -> RecipeError:
    """A bad row met while training, as one line naming it. One process alone saves a checkpoint
    of the steps done first (no peer has to agree); ranks may meet the row at different steps, so
    there the last periodic checkpoint is the resume point."""
    saved = ""
    if t.session.world_size == 1 and t.state.step > t.state.last_checkpoint_step:
        resume.save_checkpoint(t)  # at a step boundary: the window the row cut short is not in it
        saved = f" (the {t.state.step} steps before it are saved: fix the row and run the same command)"
    argument = e.error.argument
    return RecipeError(f"{e.key}.{argument}" if argument else e.key, f"{e}{saved}")


def _background_writes(recipe: Recipe) -> BackgroundWrite | None:
    """checkpoint.async_save: the writer thread, with a process group of its own (every rank makes
    it, here, in the same order)."""
    if not recipe.checkpoint.async_save:
        return None
    return BackgroundWrite(distributed.own_group())


def _profiler(recipe: Recipe, env: ClusterEnv, device: torch.device) -> StepProfiler | None:
    cfg = recipe.log.profile
    if cfg is None or env.rank not in cfg.ranks:
        return None
    from launcher.observe.profiling import StepProfiler

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
    """startup.json, the start-up timings: a report, so a failed write (a run directory made
    read-only, a full disk) is a warning, and the run goes on to save its checkpoint."""
    report = startup.report()
    try:
        atomic_write(path, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    except TrainingError as e:
        log.warning(f"{e}; the start-up report is not saved")
    if "launcher_s" in report:
        log.info(
            f"first optimizer step {report['first_step_s']:.2f} s after process start: import torch "
            f"{report['torch_s']:.2f} s, model {report['model_build_s']:.2f} s, to the device "
            f"{report['to_device_s']:.2f} s, optimizer {report['optimizer_build_s']:.2f} s, the first step itself "
            f"{report['first_step_itself_s']:.2f} s, the launcher's own {report['launcher_s']:.2f} s"
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
    launched = env.source + (f" (restart {env.restart_count})" if env.restart_count else "")
    if simulate:
        launched += f", simulating {simulate} ranks in this one process"
    rows = [("launched by", launched), *plan.describe(), *extra, ("parameters", memory.describe_parameters(model))]
    width = max(len(k) for k, _ in rows)
    log.info("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
