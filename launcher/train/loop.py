"""The training loop: windows of micro-batches, one optimizer step per window.

Reads top to bottom: `fit` runs epochs, `train_epoch` runs windows, `micro_step` runs one
forward/backward, `optimizer_step` clips and steps. Nothing here calls `.item()` or otherwise waits
for the device except at log, eval and end steps.

Loss scaling (launcher/train/window.py): micro-batch i of a window holds n_i of the window's n_window
real samples (or valid tokens) over all ranks. Its mean loss is multiplied by n_i * W / n_window;
DDP and FSDP average gradients over the W ranks, so the summed gradient is exactly that of the mean
loss over the window's samples (tokens): the big-batch update, for any W and accumulation,
including an epoch's last, partial window.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import time
from collections.abc import Iterator

import torch

from launcher.cluster import distributed
from launcher.cluster.cpu import duration
from launcher.data import batches
from launcher.data.loading import Batch, to_device, workers_stopped_on_error
from launcher.errors import ArgumentError, DataRowError, TrainingError
from launcher.observe import startup
from launcher.observe.logs import log
from launcher.parallel import memory
from launcher.rng import capture_rng_state, restore_rng_state
from launcher.train import resume, window
from launcher.train.evaluation import evaluate
from launcher.train.loop_state import Trainer, TrainState


def fit(t: Trainer) -> TrainState:
    s, p = t.state, t.data.plan
    startup.mark("loop")  # from here to the first step's end: the step itself (startup.report)
    t.window.started_at = time.perf_counter()
    t.modules.train_model.train()
    if t.observe.profiler is not None:
        t.observe.profiler.after_step(s.step)  # start_step may be 0, or where a resumed run starts
    if t.observe.heartbeat is not None:
        t.observe.heartbeat.start()
    try:
        if s.pending_eval and t.data.val_loader is not None:
            evaluate_and_maybe_stop(t)  # the one a stop signal interrupted, before the checkpoint
        while s.step < p.total_steps and s.stop_reason is None:
            train_epoch(t)
        if t.observe.profiler is not None:
            t.observe.profiler.close()
        if t.control.agreement is not None:
            t.control.agreement.drain()
        if s.stop_reason is None:
            s.stop_reason = "completed"
        if t.data.val_loader is not None and s.last_eval_step != s.step and t.control.stop_signal is None:
            evaluate_and_maybe_stop(t)
    finally:
        if t.observe.heartbeat is not None:
            t.observe.heartbeat.stop()
    return s


def train_epoch(t: Trainer) -> None:
    s, p = t.state, t.data.plan
    if s.step_in_epoch >= p.steps_per_epoch:  # resume.check_compatible refuses such a checkpoint
        raise RuntimeError(f"step {s.step_in_epoch} of an epoch of {p.steps_per_epoch} steps")
    micro_index = s.step_in_epoch * p.accumulation
    shards: list[tuple[int, Iterator[Batch]]] = []
    for rank, sampler, loader in t.data.shards:
        sampler.set_epoch(s.epoch)  # without it every epoch would see the same order
        sampler.set_start(micro_index * p.micro_batch)
        shards.append((rank, iter(loader)))
    with workers_stopped_on_error(stream for _, stream in shards):
        try:
            _train_windows(t, shards, micro_index)
        except ArgumentError as e:  # a bad row of a stream, met as it was read
            raise DataRowError("data.train", e) from None


def _train_windows(t: Trainer, shards: list[tuple[int, Iterator[Batch]]], micro_index: int) -> None:
    s, p = t.state, t.data.plan
    while s.step_in_epoch < p.steps_per_epoch and s.step < p.total_steps and s.stop_reason is None:
        if t.observe.heartbeat is not None:
            t.observe.heartbeat.mark(f"step {s.step + 1}/{p.total_steps}")
        # one window: n_micro micro-batches on every rank, gradients all-reduced on the last
        n_micro = p.window_micro_batches(s.step_in_epoch)
        n_window = p.window_samples(s.step_in_epoch)
        micro = window.micro_batches(t, shards, n_micro, micro_index, n_window)
        if t.modules.strategy.runs_windows:  # a pipeline: its schedule runs the window's micro-batches
            window_step(t, list(micro), n_window)
        else:
            for m, rank, batch, weight, log_weight in micro:
                with _rng_of(t, rank):
                    micro_step(t, batch, weight, log_weight, sync=m == n_micro - 1)
        micro_index += n_micro
        end_of_epoch = s.step_in_epoch + 1 == p.steps_per_epoch and not p.streamed
        log_now = (s.step + 1) % t.recipe.log.every_n_steps == 0 or s.step + 1 == p.total_steps or end_of_epoch
        optimizer_step(t, want_norm=log_now)
        s.step += 1
        s.step_in_epoch += 1
        t.window.add_step(n_window)
        after_step(t, log_now, end_of_epoch)
        if end_of_epoch:
            break  # the next epoch needs set_epoch and a fresh iterator


def after_step(t: Trainer, log_now: bool, end_of_epoch: bool) -> None:
    """What follows an optimizer step, in order: log, evaluate, turn the epoch, checkpoint, agree on a stop."""
    s = t.state
    if "first_step" not in startup.marks:
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)  # once: the step has really happened
        startup.mark("first_step")
    t.observe.log.advance(s.step)
    if t.observe.profiler is not None:
        t.window.profiled |= t.observe.profiler.active
        t.observe.profiler.after_step(s.step)
    if log_now:
        log_train(t)
    every = t.recipe.train.eval_every_steps
    if t.data.val_loader is not None and ((every and s.step % every == 0) or (not every and end_of_epoch)):
        evaluate_and_maybe_stop(t)
    if end_of_epoch:
        s.epoch, s.step_in_epoch = s.epoch + 1, 0  # before saving: a resume starts the next epoch
    ckpt_every = t.recipe.checkpoint.every_n_steps
    if ckpt_every and s.step % ckpt_every == 0:
        resume.save_checkpoint(t, blocking=False)  # in the background with checkpoint.async_save
    stop_agreed(t)


def stop_agreed(t: Trainer) -> bool:
    """Have the ranks agreed to stop on a signal? Every rank calls this at the same points."""
    if t.control.agreement is None:
        return False
    agreed = t.control.agreement.poll(t.control.preempt.signum or 0 if t.control.preempt is not None else 0)
    if agreed and t.control.stop_signal is None:
        t.control.stop_signal = agreed
        kind = "interrupted" if agreed == signal.SIGINT else "preempted"
        t.state.stop_reason = f"{kind} ({signal.Signals(agreed).name})"
    return bool(agreed)


@contextlib.contextmanager
def _rng_of(t: Trainer, rank: int) -> Iterator[None]:
    """When simulating ranks, run with `rank`'s own RNG streams (dropout masks then match the real run)."""
    if t.data.rank_rng is None:
        yield
        return
    restore_rng_state(t.data.rank_rng[rank])
    try:
        yield
    finally:
        t.data.rank_rng[rank] = capture_rng_state()


def micro_step(
    t: Trainer, batch: Batch, weight: float | torch.Tensor, log_weight: float | torch.Tensor, sync: bool
) -> None:
    """Forward and backward of one micro-batch: its mean loss x `weight` (which includes the number
    of ranks DDP or FSDP averages over: 1 when ranks are only simulated); gradients are reduced
    only when `sync`. The log adds the loss x `log_weight`: the window's mean x its samples, over all."""
    m, scaler = t.modules, t.optim.scaler
    batch = to_device(batch, t.device)
    if t.recipe.train.channels_last and isinstance(batch, (tuple, list)) and getattr(batch[0], "ndim", 0) == 4:
        batch = [batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]]
    with m.strategy.gradient_sync(m.train_model, sync):
        with m.autocast():
            loss = m.train_model(batch)  # the model and the loss, in one module
        # 1.0 in every full window of samples without accumulation: no extra operator
        weighted = loss if isinstance(weight, float) and weight == 1.0 else loss * weight
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
    # read at log steps and before saves, never here: a NaN is found there, with its step
    if isinstance(log_weight, torch.Tensor):
        t.window.loss_sums[t.window.steps].add_(loss.detach() * log_weight)
    else:
        t.window.loss_sums[t.window.steps].add_(loss.detach(), alpha=log_weight)


def window_step(t: Trainer, micro: list[window.Micro], n_window: int) -> None:
    """A window run by the strategy's schedule (pipeline parallelism): the same micro-batches and
    weights as `micro_step`'s. The log adds each micro-batch's mean x its log weight, which is its
    weighted loss x n_window / W (window.py: weight = share x W, log weight = share x n_window)."""
    p, strategy = t.data.plan, t.modules.strategy
    weighted = strategy.step_window(
        [batch for _, _, batch, _, _ in micro], [w for _, _, _, w, _ in micro], p.accumulation, p.micro_batch
    )
    t.window.loss_sums[t.window.steps].add_(weighted * (n_window / strategy.gradient_mean_over))


def optimizer_step(t: Trainer, want_norm: bool = False) -> None:
    """`want_norm`: also measure the gradient norm (for the log), if clipping does not already."""
    cfg, o, strategy = t.recipe.train, t.optim, t.modules.strategy
    if o.scaler is not None:
        o.scaler.unscale_(o.optimizer)  # clip the true gradients, not the scaled ones
    params = t.modules.params
    norm = None
    if cfg.grad_clip_norm is not None:
        norm = strategy.clip_grad_norm(params, cfg.grad_clip_norm)
    elif cfg.grad_clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, cfg.grad_clip_value)
    if norm is None and (want_norm or cfg.on_nonfinite == "skip"):
        norm = strategy.grad_norm(params)  # before value clipping
    t.window.grad_norm = norm if want_norm else None  # kept only for the log row: no tensor outlives the step
    # after the all-reduce every rank holds the same gradients, so all decide alike; this is
    # the one mode that syncs with the device every step
    if cfg.on_nonfinite == "skip" and norm is not None and not torch.isfinite(norm).item():
        _skip_step(t)
        return
    t.state.consecutive_skips = 0
    if o.scaler is not None:
        o.scaler.step(o.optimizer)
        o.scaler.update()
    else:
        o.optimizer.step()
    if o.scheduler is not None:
        o.scheduler.step()
    o.optimizer.zero_grad(set_to_none=True)


def _skip_step(t: Trainer) -> None:
    """train.on_nonfinite=skip: drop this step's gradients; the schedule still advances."""
    cfg, s = t.recipe.train, t.state
    s.skipped_steps += 1
    s.consecutive_skips += 1
    if s.consecutive_skips >= cfg.max_consecutive_skips:
        last = s.last_checkpoint_step
        kept = f"the last checkpoint (step {last}) is intact" if last >= 0 else "no checkpoint was written"
        raise TrainingError(
            f"non-finite gradients in {s.consecutive_skips} steps in a row, up to step {s.step + 1} "
            f"(train.max_consecutive_skips={cfg.max_consecutive_skips}); the run is diverging: "
            f"nothing after it was saved and {kept}"
        )
    log.warning(f"step {s.step + 1}: non-finite gradients, step skipped ({s.skipped_steps} so far)")
    if t.optim.scaler is not None:
        t.optim.scaler.update()  # lowers the scale, as a GradScaler-skipped step does
    if t.optim.scheduler is not None:
        t.optim.scheduler.step()  # the schedule follows the step count
    t.optim.optimizer.zero_grad(set_to_none=True)


def log_train(t: Trainer) -> None:
    """The log step: the only place the training loop synchronises with the device and the ranks."""
    s = t.state
    after_first_row = t.observe.startup_logged  # this process's first row holds its first step (warm-up, compile)
    per_rank = resume.check_finite(t)  # [ranks, steps since the last log]; raises on a non-finite loss
    w = t.window
    label_counts = torch.cat(w.label_counts).tolist() if w.label_counts else []  # token-weighted runs
    if label_counts and t.session.is_main:
        _report_unlabelled(s.step, label_counts)
    loss_sum = float(per_rank.sum())  # the window sizes in w.samples are already global
    elapsed = max(time.perf_counter() - w.started_at, 1e-9)
    timed_samples, timed_steps = w.samples - w.restored_samples, w.steps - w.restored_steps
    samples_per_s = timed_samples / elapsed
    row = {
        "step": s.step,
        "epoch": s.epoch,
        "loss": loss_sum / w.samples,
        "samples": w.samples,
        "lr": t.optim.optimizer.param_groups[0]["lr"],
    }
    if w.grad_norm is not None:
        row["grad_norm"] = w.grad_norm.item()
    row["samples_per_s"] = samples_per_s
    if t.observe.tokens_per_sample:
        row["tokens_per_s"] = samples_per_s * t.observe.tokens_per_sample
    elif label_counts:  # samples of different lengths: the tokens the loss counted (labels), per second
        row["tokens_per_s"] = sum(label_counts) / elapsed
    row |= window.padding_metrics(w.token_tallies, elapsed)
    row["step_time_s"] = elapsed / max(timed_steps, 1)
    row["data_wait"] = w.data_wait_s / elapsed
    if t.device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
    else:  # the process's peak resident memory
        row["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if t.observe.flops_per_sample and t.observe.peak_flops:
        row["mfu"] = t.observe.flops_per_sample * samples_per_s / (t.observe.peak_flops * t.data.plan.world_size)
    if s.skipped_steps:
        row["skipped_steps"] = s.skipped_steps
    if w.profiled:
        row["profiled"] = True  # the profiler's overhead is in this row's times
    if "first_step" in startup.marks and not t.observe.startup_logged:
        row["startup_s"] = startup.report()["first_step_s"]  # process start to the end of the first step
        # once the optimizer holds its state: what this rank keeps between steps (its shards under FSDP)
        row["state_mib"] = memory.local_state_bytes(t.modules.params, t.optim.optimizer) / 2**20
        t.observe.startup_logged = True
    t.observe.log(row)
    if t.observe.step_time_estimate is not None and after_first_row and timed_steps > 0:
        # the first window without this process's first step: the real figure beside the plan's
        e = t.observe.step_time_estimate
        log.info(
            f"step time: {duration(row['step_time_s'])} measured over steps {s.step - timed_steps + 1}-{s.step}, "
            f"{row['step_time_s'] / e.seconds:.1f}x the plan's estimate of {e.describe()}"
        )
        t.observe.step_time_estimate = None
    w.reset()


def _report_unlabelled(step: int, label_counts: list[int]) -> None:
    """Steps whose window had no label to learn from (every one -100): their gradients were zero."""
    empty = [step - len(label_counts) + 1 + i for i, k in enumerate(label_counts) if k == 0]
    if empty:
        steps = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        log.warning(
            f"step {steps}: no valid label in the whole window (all {batches.IGNORE_INDEX}), so no gradient; "
            "check the data's labels (a prompt mask or truncation that leaves nothing to predict?)"
        )


def evaluate_and_maybe_stop(t: Trainer) -> dict[str, float] | None:
    s = t.state
    if t.observe.heartbeat is not None:
        t.observe.heartbeat.mark(f"evaluation at step {s.step}")
    try:
        metrics = _evaluate(t)
    except ArgumentError as e:  # a bad validation row (of a custom dataset: built-in ones check theirs when built)
        raise DataRowError("data.val", e) from None
    s.pending_eval = metrics is None
    if metrics is None:
        return None
    s.last_eval_step = s.step
    t.observe.log({"step": s.step, "epoch": s.epoch, **metrics})
    es = t.recipe.train.early_stopping
    if es is not None and es.metric in metrics:
        value = metrics[es.metric]
        better = s.best_metric is None or (
            value < s.best_metric - es.min_delta if es.mode == "min" else value > s.best_metric + es.min_delta
        )
        if better:
            s.best_metric, s.bad_evals = value, 0
        else:
            s.bad_evals += 1
        # the metric is all-reduced, so ranks agree; rank 0's word makes it certain
        if distributed.broadcast_flag(s.bad_evals >= es.patience, t.device) and s.stop_reason is None:
            s.stop_reason = f"early stopping: {es.metric} did not improve for {es.patience} evaluations"
    return metrics


def _evaluate(t: Trainer) -> dict[str, float] | None:
    assert t.data.val_loader is not None and t.data.plan.val_samples is not None
    return evaluate(
        t.modules.eval_model or t.modules.model,
        t.data.val_loader,
        t.modules.loss_fn,
        t.data.counting,
        t.data.plan.val_samples,
        t.device,
        t.modules.autocast,
        t.recipe.train.eval_max_batches,
        should_stop=lambda: stop_agreed(t),
        every_rank_forwards=t.modules.eval_model not in (None, t.modules.model),
        sum_over_data=t.modules.strategy.sum_over_data,
        local_batch=lambda batch: t.modules.strategy.local_batch(batch, t.data.counting.shift),
        counts_samples=t.modules.strategy.counts_samples,
    )
