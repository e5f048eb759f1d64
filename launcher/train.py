"""One training run, start to end, in the order data flows:
recipe -> process group -> data -> model (+ checkpoint) -> wrappers -> optimizer -> loop -> weights."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from launcher import checkpoint, distributed, loop, parallel, resume, rng, startup
from launcher.builders import build_datasets, build_model
from launcher.components import instantiate, resolve_callable
from launcher.cpu import step_time_estimate, threads_per_rank
from launcher.data import SeededDataset, ShardSampler, build_loader
from launcher.env import ClusterEnv
from launcher.errors import Preempted, RecipeError, TrainingError
from launcher.memory import checkpoint_bytes
from launcher.logs import log, setup_logging
from launcher.metrics import (ConsoleSink, JsonlSink, Metrics, ProgressSink, TensorBoardSink, peak_flops,
                              read_metrics)
from launcher.optim import build_optimizer, build_scheduler
from launcher.plan import Plan, build_plan, plan_warnings
from launcher.recipe import Recipe
from launcher.signals import Agreement, PreemptionFlag, parse_signal

def prepare_run_dir(recipe: Recipe, restart_count: int = 0, rank: int = 0, act: bool = True) -> Path | None:
    """Decide where the run starts: the checkpoint to resume, or None for a fresh start. A fresh
    start over a previous run's outputs needs run.overwrite (which then deletes its checkpoints,
    and only those); a worker restarted by torchrun or a SLURM requeue is the same run and may start
    over. `act=False` only validates (the parent of `--nproc` workers): it deletes nothing and warns
    of nothing, which the workers' rank 0 does."""
    layout = recipe.layout
    layout.preflight()
    acting = act and rank == 0
    if acting:
        layout.remove_stale_temporaries()
    resume_from = checkpoint.resolve_resume(recipe.checkpoint.resume, layout.checkpoints, warn=acting)
    if resume_from is not None or restart_count > 0:
        return resume_from
    checkpoints = checkpoint.list_checkpoints(layout.checkpoints)
    found = [str(p) for p in layout.outputs if p.exists()] + [str(p) for p in checkpoints[:1]]
    if found and not recipe.run.overwrite:
        how = "resume it with checkpoint.resume=auto, " if recipe.checkpoint.resume == "none" and checkpoints else ""
        raise RecipeError("run.dir", f"{layout.root} already holds a run ({', '.join(found)}); {how}choose another "
                                     f"run.dir=..., or start over with run.overwrite=true")
    if found and (acting or layout.foreign_checkpoint_entries()):
        # a fresh start must never resume an older run's state; every rank refuses a foreign directory alike
        layout.clear_checkpoints()
    return None


def run(recipe: Recipe, env: ClusterEnv, simulate: int | None = None) -> loop.TrainState:
    """Train. `simulate=N`: one process reproduces the arithmetic of an N-rank run (launcher debug)."""
    setup_logging(env.rank)
    threads, why = threads_per_rank(env.local_world_size)
    torch.set_num_threads(threads)  # N ranks x all cores each would oversubscribe the CPU
    if env.rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 \
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        log.warning("torchrun restarts can fail to reconnect when the workers share the rendezvous store "
                    "(pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
    signals = [parse_signal("SIGTERM"), parse_signal(recipe.checkpoint.preempt_signal), signal.SIGINT]
    # installed first: a preemption signal during start-up is remembered, not fatal
    with PreemptionFlag(list(dict.fromkeys(signals))) as preempt:
        with distributed.session(env, recipe.dist.backend, recipe.dist.timeout_s) as sess:
            try:
                return _train(recipe, env, sess, preempt, simulate, threads=f"{threads} ({why})")
            except BaseException as e:
                # the traceback pins the frames that hold DDP; free them so it goes before the process group
                traceback.clear_frames(e.__traceback__)
                if env.world_size > 1 and distributed.is_timeout(e):
                    who = distributed.missing_ranks(sess.control, env.rank, min(recipe.dist.timeout_s, 30.0))
                    raise TrainingError(f"[rank {env.rank}] a collective timed out after dist.timeout_s="
                                        f"{recipe.dist.timeout_s:g}s: {who}") from None
                raise
            finally:
                # DDP's reducer (and any Python comm hook it holds) must be destroyed before the
                # process group: left to interpreter exit, its destructor can abort the process
                gc.collect()


def _train(recipe: Recipe, env: ClusterEnv, sess, preempt: PreemptionFlag, simulate: int | None,
           threads: str) -> loop.TrainState:
    # rank 0 writes the run directory: it holds the lock until it exits, however it exits
    with recipe.layout.locked() if env.is_rank0 else contextlib.nullcontext():
        return _train_locked(recipe, env, sess, preempt, simulate, threads)


def _train_locked(recipe: Recipe, env: ClusterEnv, sess, preempt: PreemptionFlag, simulate: int | None,
                  threads: str) -> loop.TrainState:
    resume_from = prepare_run_dir(recipe, env.restart_count, env.rank)
    train_set, val_set = build_datasets(recipe)
    plan = build_plan(recipe, simulate or env.world_size, len(train_set), len(val_set) if val_set is not None else None,
                      sess.backend, str(sess.device))
    startup.mark("model_start")
    model = build_model(recipe)
    startup.mark("model")
    if env.is_rank0 and (space := recipe.layout.space_warning(checkpoint_bytes(model))):
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
        raise RecipeError("loss._component_", f"{recipe.loss['_component_']} built a {type(loss_fn).__name__}, which "
                                              "cannot be called; name a loss module or function")
    startup.mark("optimizer_start")
    optimizer = build_optimizer(recipe, model)
    startup.mark("optimizer")
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler(sess.device.type) if recipe.train.precision == "fp16" else None
    ranks = range(simulate) if simulate else [env.rank]
    shards, val_loader = _loaders(recipe, plan, env, sess, train_set, val_set, preempt.signals, ranks)
    segments, head_chunks = _checkpointing(recipe, model, loss_fn, shards[0][2], sess.device, optimizer)
    comm_hook = None
    if recipe.dist.ddp.comm_hook is not None:
        comm_hook = resolve_callable(recipe.dist.ddp.comm_hook, "dist.ddp.comm_hook")
    train_model = parallel.wrap(model, loss_fn, segments=segments, head_chunks=head_chunks, world_size=env.world_size,
                                device=sess.device, ddp_cfg=recipe.dist.ddp, comm_hook=comm_hook,
                                compile_=recipe.train.compile)
    t = loop.Trainer(recipe, plan, sess, model, train_model, loss_fn, optimizer, scheduler, scaler,
                     shards, val_loader, log=Metrics([]), preempt=preempt,
                     agreement=Agreement(sess.control if env.world_size > 1 else None),
                     tokens_per_sample=_attr("tokens_per_sample", model, train_set),
                     flops_per_sample=_attr("flops_per_sample", model, train_set),
                     peak_flops=peak_flops(sess.device, recipe.train.precision),
                     heartbeat=loop.Heartbeat() if env.is_rank0 else None)
    t.profiler = _profiler(recipe, env, sess.device)
    loop.new_log_window(t)
    if payload is not None:
        resume.restore(t, payload, resume_from)  # last: it sets the RNG streams the loop continues
        del payload
    if simulate:  # each simulated rank starts with the streams that rank would have
        t.rank_rng = {}
        for r in ranks:
            rng.seed_everything(recipe.seed + r)
            t.rank_rng[r] = checkpoint.capture_rng()
    extra = [("threads per rank", threads)]
    if env.is_rank0 and sess.device.type == "cpu" and t.flops_per_sample:
        extra.append(("step time (estimate)", step_time_estimate(t.flops_per_sample, plan.global_batch,
                                                                 recipe.train.precision)))
    _print_plan(plan, env, model, simulate, extra)
    if env.is_rank0:
        for warning in plan_warnings(recipe, plan, sess.device.type):
            log.warning(warning)
    if env.is_rank0:
        t.log = _metrics(t, resumed=resume_from is not None, continuing=resume_from is not None or env.restart_count > 0)
    ok = False
    try:
        state = loop.fit(t)
        if env.is_rank0 and "first_step" in startup.marks:
            _write_startup(recipe.run_dir)
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
            raise Preempted(f"{state.stop_reason} at step {state.step}: checkpoint saved; run the same command "
                            "to continue", 128 + signal.SIGINT)
        code = recipe.checkpoint.requeue_exit_code
        raise Preempted(f"{state.stop_reason} at step {state.step}: checkpoint saved, exiting with {code} to be requeued", code)
    if env.is_rank0:
        # CPU tensors: loadable on any machine without map_location
        checkpoint.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, recipe.layout.weights)
        log.info(f"done: {state.stop_reason} after {state.step} steps; weights in {recipe.layout.weights}")
    return state


def _profiler(recipe: Recipe, env: ClusterEnv, device: torch.device):
    cfg = recipe.log.profile
    if cfg is None or env.rank not in cfg.ranks:
        return None
    from launcher.profiling import StepProfiler
    return StepProfiler(recipe.run_dir / "profile", f"rank{env.rank}", device, cfg.start_step, cfg.steps,
                        memory=cfg.memory, with_stack=cfg.with_stack)


def _loaders(recipe: Recipe, plan: Plan, env: ClusterEnv, sess, train_set, val_set, signals, ranks):
    """One training shard per rank this process trains (its own, or each simulated rank's)."""
    d = recipe.data
    pin = d.pin_memory if d.pin_memory is not None else sess.device.type == "cuda"
    common = dict(num_workers=d.num_workers, pin_memory=pin, prefetch_factor=d.prefetch_factor,
                  ignore_signals=tuple(signals))
    seeded = SeededDataset(train_set, recipe.seed)
    shards = []
    for rank in ranks:
        sampler = ShardSampler(train_set, num_replicas=plan.world_size, rank=rank, shuffle=d.shuffle,
                               seed=recipe.seed if d.seed is None else d.seed, drop_last=d.drop_last,
                               stop=plan.shard_stop, with_epoch=True)
        shards.append((rank, sampler, build_loader(seeded, sampler, plan.micro_batch, seed=recipe.seed + rank, **common)))
    val_loader = None
    if val_set is not None:  # evaluation sums over samples: a simulated run evaluates unsharded
        val_sampler = ShardSampler(val_set, num_replicas=env.world_size, rank=env.rank, shuffle=False,
                                   seed=recipe.seed, drop_last=False)
        val_loader = build_loader(val_set, val_sampler, plan.micro_batch, seed=recipe.seed + env.rank, **common)
    return shards, val_loader


def _checkpointing(recipe: Recipe, model, loss_fn, loader, device, optimizer) -> tuple[int, int]:
    """(segments, head_chunks): from the recipe, or probed (segments: auto)."""
    ac = recipe.train.activation_checkpointing
    if ac.segments != "auto":
        return ac.segments, ac.head_chunks
    from launcher import memory
    from launcher.data import to_device

    # Adam-like optimizers will hold two tensors per parameter once they step
    state_gib = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    batch = to_device(next(iter(loader)), device)
    segments, chunks, _ = memory.choose(model, loss_fn, batch, device, lambda: loop.autocast(recipe.train.precision, device),
                                        ac.max_memory_gib, state_gib)
    return segments, chunks


def _write_startup(run_dir: Path) -> None:
    report = startup.report()
    (run_dir / "startup.json").write_text(json.dumps(report, indent=1) + "\n")
    if "launcher_s" in report:
        log.info(f"first optimizer step {report['first_step_s']:.2f} s after process start: import torch "
                 f"{report['torch_s']:.2f} s, model {report['model_build_s']:.2f} s, optimizer "
                 f"{report['optimizer_build_s']:.2f} s, the rest {report['launcher_s']:.2f} s")


def _metrics(t: loop.Trainer, resumed: bool, continuing: bool) -> Metrics:
    """Rank 0's sinks. `resumed`: from a checkpoint; `continuing`: the same run (resumed or restarted)."""
    recipe, run_dir, step = t.recipe, t.recipe.run_dir, t.state.step
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(run_dir / "config.yaml", lambda f: f.write(recipe.to_yaml().encode()))
    path = recipe.layout.metrics
    if resumed and path.exists():
        # continue the history: rows past the checkpoint were trained again and are logged again;
        # a row torn by a crash mid-write is dropped (and rewritten when its step is trained again)
        rows, torn = read_metrics(path)
        if torn:
            log.warning(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
        kept = [json.dumps(r, allow_nan=True) for r in rows if r.get("step", 0) <= step]
        checkpoint.atomic_write(path, lambda f: f.write("".join(r + "\n" for r in kept).encode()))
    sinks: list = [JsonlSink(path, append=resumed)]
    progress = recipe.log.progress
    if progress == "bar" or (progress == "auto" and sys.stdout.isatty()):
        sinks.append(ProgressSink(t.plan.total_steps, step))
    else:
        sinks.append(ConsoleSink(t.plan.total_steps))
    if recipe.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", step))
    if recipe.log.wandb is not None:
        from launcher import wandb_log
        run_id = wandb_log.run_id(run_dir, t.logger_ids.get("wandb"), continuing)
        t.logger_ids["wandb"] = run_id
        sinks.append(wandb_log.WandbSink(recipe, run_dir, run_id))
    return Metrics(sinks)


def _attr(name: str, *objects) -> float | None:
    """A per-sample figure the model or the dataset declares (GPT: tokens_per_sample, flops_per_sample)."""
    for obj in objects:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return value
    return None


def _print_plan(plan: Plan, env: ClusterEnv, model: torch.nn.Module, simulate: int | None,
                extra: list[tuple[str, str]]) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    launched = env.source + (f" (restart {env.restart_count})" if env.restart_count else "")
    if simulate:
        launched += f", simulating {simulate} ranks in this one process"
    rows = [("launched by", launched), *plan.describe(), *extra, ("parameters", f"{n_params:,}")]
    width = max(len(k) for k, _ in rows)
    log.info("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
