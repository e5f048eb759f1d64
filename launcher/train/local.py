"""N local worker processes through torch's own elastic agent, on a free port (`launcher run
--nproc N`, `launcher doctor --nproc N`, `launcher debug --distributed`): start them, relay a
preemption signal, report a failed or restarted worker in one line."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.cluster import causes, hang_report
from launcher.errors import LaunchError

if TYPE_CHECKING:  # torch's elastic modules are imported where used: they are slow to import
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

SHUTDOWN_GRACE_S = 120
# set for the workers: they stay quiet on fatal errors (the parent prints one line for the whole job)
CHILD_ENV = "LAUNCHER_CHILD"
# set for the workers: the pid of the process whose death must end them (signals.die_with_parent)
PARENT_PID_ENV = "LAUNCHER_PARENT_PID"


def elastic(
    worker_args: list[str],
    nproc: int,
    max_restarts: int = 0,
    preempt: str | None = None,
    requeue_exit_code: int | None = None,
    checkpoint_dir: Path | None = None,
    hang_dir: Path | None = None,
) -> int:
    """Start `python -m launcher WORKER_ARGS` in `nproc` local workers under torch's elastic agent.
    `checkpoint_dir`: where the workers checkpoint when stopped by a signal; the requeue exit code
    is returned only if a checkpoint was written there since the launch (told by the checkpoints
    there before and after, not by clocks: the workers' may differ from this one's). `hang_dir`: where
    the workers write their hang reports (cluster/hang.py); SIGUSR2 here asks each of them for one."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from launcher.cluster.signals import parse_signal

    check_workers_import_this_launcher(Path.cwd())
    os.environ[CHILD_ENV] = "1"  # workers stay quiet on fatal errors: _summarize prints one line
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # workers die with this process (signals.die_with_parent)
    before = checkpoints_seen(checkpoint_dir) if checkpoint_dir is not None else {}
    # a restarted worker group can read the previous attempt's addresses from a store shared with
    # the rendezvous and fail to connect (pytorch/pytorch#135712); a store per attempt avoids it
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # no OMP_NUM_THREADS here: each worker takes its share of the cores (cpu.threads_per_rank)
    preempt_sig = parse_signal(preempt) if preempt else None
    if preempt_sig is not None:

        def on_preempt(_signum: int, _frame: object) -> None:
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
        _RestartReporter.install()
    extra: dict[str, Any] = {}
    if "shutdown_timeout" in inspect.signature(LaunchConfig).parameters:  # torch >= 2.10
        extra["shutdown_timeout"] = SHUTDOWN_GRACE_S  # time the workers get to checkpoint when stopped
    # our own log directory: the failure summary reads every rank's recorded cause from it
    log_dir = Path(tempfile.mkdtemp(prefix="launcher-workers-"))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # port 0: the agent picks a free one
        max_restarts=max_restarts,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)),
        **extra,
    )
    # SIGUSR2 asks every worker for its hang report (unless it is the preemption signal)
    reporter = hang_report.Reporter(
        hang_dir if preempt_sig != hang_report.REPORT_SIGNAL else None,
        nproc,
        lambda line: print(line, file=sys.stderr, flush=True),
    )
    try:
        elastic_launch(config, sys.executable)("-m", "launcher", *worker_args)
    except ChildFailedError as e:
        code = _summarize(e, causes.last_attempt(log_dir))
        for line in reporter.final():
            print(line, file=sys.stderr, flush=True)  # last: where each rank was, when a collective timed out
        return code
    except SignalException as e:  # the agent stopped the workers, passing them the signal
        saved = checkpoint_since(checkpoint_dir, before) if checkpoint_dir is not None else None
        if saved is None:
            after = "; no checkpoint was written (nothing to resume from this attempt)" if checkpoint_dir else ""
            print(f"stopped by {e.sigval.name}{after}", file=sys.stderr, flush=True)
            return 128 + int(e.sigval)
        if requeue_exit_code is not None and e.sigval in (signal.SIGTERM, preempt_sig):
            print(
                f"preempted ({e.sigval.name}): workers checkpointed ({saved}); exiting with {requeue_exit_code} "
                "to be requeued",
                file=sys.stderr,
                flush=True,
            )
            return requeue_exit_code
        print(
            f"stopped by {e.sigval.name}: workers checkpointed ({saved}); run the same command to continue",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        reporter.uninstall()
    return 0


def check_workers_import_this_launcher(directory: Path) -> None:
    """`python -m launcher`, started in `directory`, puts it first on the import path: a folder
    named `launcher` there (or a `launcher.py`) is what the workers would import as the launcher, and
    each would die on an ImportError (or run that file) while this process, started by the
    `launcher` command, imports the installed one. Only a folder that would win is refused: an empty
    one loses to an installed package on the path (not to an editable install's import hook)."""
    from importlib.machinery import PathFinder

    import launcher

    ours = Path(str(launcher.__file__)).resolve().parent  # this process imported the package itself
    rest = [p for p in sys.path if p and Path(p).resolve() != directory.resolve()]
    spec = PathFinder.find_spec("launcher", [str(directory), *rest])
    if spec is None:  # found by a meta-path hook (an editable install's), as the workers will
        return
    where = [Path(spec.origin)] if spec.origin else [Path(p) for p in spec.submodule_search_locations or []]
    for path in where:
        found = path.resolve()
        shadow = found.parent if found.name == "__init__.py" else found  # a package's folder, or launcher.py
        if shadow.parent == directory.resolve() and shadow != ours:
            is_file = shadow.suffix == ".py"
            what = "a file named launcher.py" if is_file else "a folder named launcher"
            fate = f"{'run' if is_file else 'import'} it in place of the launcher this command runs ({ours})"
            raise LaunchError(
                str(shadow),
                f"{what} in the directory the workers start from, which `python -m launcher` puts first on the "
                f"import path: the workers would {fate}; run from another directory, or rename it",
            )


def checkpoints_seen(directory: Path) -> dict[str, bytes]:
    """The checkpoint directories in `directory` now, with their COMPLETE markers' bytes (b"" for none)."""
    from launcher.checkpoint.step_dirs import MARKER, list_checkpoints

    seen = {}
    for path in list_checkpoints(directory):
        try:
            seen[path.name] = (path / MARKER).read_bytes()
        except OSError:
            seen[path.name] = b""
    return seen


def checkpoint_since(directory: Path, before: dict[str, bytes]) -> Path | None:
    """The newest intact checkpoint in `directory` if it was written after `before` (checkpoints_seen
    then): a new step directory, or one whose marker changed (a step saved again). Compares what is on
    disk, never the time a worker wrote into the marker with this process's clock."""
    from launcher.checkpoint.step_dirs import MARKER, find_latest

    latest = find_latest(directory, warn=False)
    if latest is None:
        return None
    try:
        marker = (latest / MARKER).read_bytes()
    except OSError:
        return None
    return latest if before.get(latest.name) != marker else None


class _RestartReporter(logging.Handler):
    """Says why the workers were restarted, which torch's agent logs only at levels the launcher
    otherwise silences: the multiprocessing layer logs the failure ("failed (exitcode: -9)
    local_rank: 1 (pid: ...)"), then the agent logs that it restarts the group."""

    FAILURE_LOGGER = "torch.distributed.elastic.multiprocessing.api"
    AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.failure: tuple[object, ...] | None = None

    @classmethod
    def install(cls) -> None:
        reporter = cls()
        for name in (cls.FAILURE_LOGGER, cls.AGENT_LOGGER):
            logger = logging.getLogger(name)
            logger.handlers[:] = [reporter]
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        message, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
        if message.startswith("failed (exitcode") and len(args) >= 3:
            self.failure = args[:3]
        elif "will restart worker group" in message and len(args) >= 4 and self.failure is not None:
            code, local_rank, pid = (int(str(a)) for a in self.failure)
            how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            print(
                f"warning: rank {local_rank} (pid {pid}) {how}; restarting the workers from the newest checkpoint "
                f"(restart {int(str(args[3])) - int(str(args[2])) + 1} of {args[3]})",
                file=sys.stderr,
                flush=True,
            )
            self.failure = None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _summarize(e: ChildFailedError, recorded: dict[int, causes.Cause]) -> int:
    """One line for the whole job: the root cause, naming the rank. `e.failures` holds the ranks that
    had exited when the agent stopped the rest; `recorded` every rank's recorded cause, including
    ranks stopped before they could exit on their own."""
    failures = e.failures
    user = sorted(
        {r for r, f in failures.items() if f.exitcode == 2} | {r for r, c in recorded.items() if c.exit_code == 2}
    )
    if user:
        rank = user[0]
        prefix = f"[rank {rank}] " if rank != 0 else ""
        message = recorded[rank].message if rank in recorded else _message(failures[rank])
        print(f"error: {prefix}{message.partition(': ')[2]}", file=sys.stderr, flush=True)
        return 2
    if not recorded:  # ranks that merely lost their peer record nothing
        codes = {f.exitcode for f in failures.values()}
        if len(codes) == 1 and next(iter(codes)) > 0:
            return next(iter(codes))  # every rank chose this exit code (preemption, doctor): pass it on
        # the agent stops the others with SIGTERM once one fails (often within the same second):
        # the rank that exited or died by itself is the one to name
        stopped = -int(signal.SIGTERM)
        rank = min(failures, key=lambda r: (failures[r].exitcode == stopped, failures[r].timestamp, r))
        failure = failures[rank]
        how = (
            f"was killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode} before recording a cause (its own output above says why)"
        )
        print(f"error: rank {rank} {how}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    rank = min(recorded, key=lambda r: (recorded[r].timestamp_s, r))
    cause = recorded[rank]
    code = cause.exit_code or 1
    if cause.message.startswith("TrainingError: "):  # already a sentence meant for the user
        print(f"error: {cause.message.partition(': ')[2]}", file=sys.stderr, flush=True)
    else:
        print(f"error: rank {rank} failed (exit code {code}): {cause.message}", file=sys.stderr, flush=True)
    return code


def _message(failure: ProcessFailure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip().splitlines()[0] if message else "no error message"
