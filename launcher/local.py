"""`launcher run --nproc N`: N local workers through torch's own elastic agent, on a free port."""
from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import uuid

from launcher.recipe import Recipe

SHUTDOWN_GRACE_S = 120


def launch_local(recipe: Recipe, args) -> int:
    """`launcher run --nproc N RECIPE`: validate once here, then N workers, each `launcher run RECIPE`."""
    from launcher.check import check_static
    from launcher.train import prepare_run_dir

    # fail here, once, before any worker starts, on everything that can be known without data
    check_static(recipe, args.nproc)
    prepare_run_dir(recipe, rank=-1)  # validate only (rank -1 deletes nothing); the workers act on it
    return elastic(["run", args.recipe, *args.overrides], args.nproc, args.max_restarts,
                   preempt=recipe.checkpoint.preempt_signal, requeue_exit_code=recipe.checkpoint.requeue_exit_code)


def elastic(worker_args: list[str], nproc: int, max_restarts: int = 0, preempt: str | None = None,
            requeue_exit_code: int | None = None) -> int:
    """Start `python -m launcher WORKER_ARGS` in `nproc` local workers under torch's elastic agent."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from launcher.cli import CHILD_ENV
    from launcher.signals import parse_signal

    os.environ[CHILD_ENV] = "1"  # workers stay quiet on fatal errors: _summarize prints one line
    # a restarted worker group can read the previous attempt's addresses from a store shared with
    # the rendezvous and fail to connect (pytorch/pytorch#135712); a store per attempt avoids it
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if nproc > 1:
        # as torchrun does: N workers x all cores each would oversubscribe the CPU
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    preempt_sig = parse_signal(preempt) if preempt else None
    if preempt_sig is not None:
        def on_preempt(signum, frame):
            # as the agent does for SIGTERM: stop supervising and pass the signal to the workers,
            # which checkpoint at their next step and exit; waiting for them is the agent's shutdown
            raise SignalException(f"received {preempt_sig.name}", sigval=preempt_sig)

        signal.signal(preempt_sig, on_preempt)
    if "LOGLEVEL" not in os.environ:
        # the agent's own failure reports repeat what the summary below says in one line;
        # each of its modules sets its own logger's level, so quiet them one by one
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    extra = {}
    if "shutdown_timeout" in inspect.signature(LaunchConfig).parameters:  # torch >= 2.10
        extra["shutdown_timeout"] = SHUTDOWN_GRACE_S  # time the workers get to checkpoint when stopped
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # port 0: the agent picks a free one
        max_restarts=max_restarts, monitor_interval=0.1, **extra,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "launcher", *worker_args)
    except ChildFailedError as e:
        return _summarize(e)
    except SignalException as e:  # the agent stopped the workers, passing them the signal
        if requeue_exit_code is not None and e.sigval in (signal.SIGTERM, preempt_sig):
            print(f"preempted ({e.sigval.name}): workers checkpointed; exiting with {requeue_exit_code} to be requeued",
                  file=sys.stderr, flush=True)
            return requeue_exit_code
        print(f"stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def _summarize(e) -> int:
    """One line for the whole job: the root cause, naming the rank."""
    failures = e.failures
    user = sorted(r for r, f in failures.items() if f.exitcode == 2)
    if user:
        rank = user[0]
        prefix = f"[rank {rank}] " if rank != 0 else ""
        print(f"error: {prefix}{_message(failures[rank]).partition(': ')[2]}", file=sys.stderr, flush=True)
        return 2
    # the earliest failure that recorded an error; ranks that merely lost their peer record none
    # (torch fills error_file_data with {"message": "<NONE>"} and the time of parsing when there is no file)
    recorded = {r: f for r, f in failures.items() if f.error_file_data.get("message") not in (None, "", "<NONE>")}
    if not recorded:
        codes = {f.exitcode for f in failures.values()}
        if len(codes) == 1 and next(iter(codes)) > 0:
            return next(iter(codes))  # every rank chose this exit code (preemption, doctor): pass it on
        rank = min(failures, key=lambda r: (failures[r].timestamp, r))
        failure = failures[rank]
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        print(f"error: rank {rank} {how}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    rank = min(recorded, key=lambda r: (recorded[r].timestamp, r))
    failure = recorded[rank]
    message = _message(failure)
    if message.startswith("TrainingError: "):  # already a sentence meant for the user
        print(f"error: {message.partition(': ')[2]}", file=sys.stderr, flush=True)
    else:
        print(f"error: rank {rank} failed (exit code {failure.exitcode}): {message}", file=sys.stderr, flush=True)
    return failure.exitcode if failure.exitcode > 0 else 1


def _message(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip().splitlines()[0] if message else "no error message"
