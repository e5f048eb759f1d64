"""A rank's side of the hang report: in `<run.dir>/hang/`, each rank keeps its collective trail
(`rank<N>.collectives.txt`, always current: cluster/trail.py) and writes its Python stacks, every
thread, into `rank<N>.stacks.txt`:

- on SIGUSR2 (the `launcher run --nproc` parent passes it on to every rank when it gets one, or when
  a rank asks for it): faulthandler writes them from its C signal handler, so a rank blocked in C
  code (a gloo or NCCL wait, a read, a sleep) answers too;
- when a collective of this rank times out: where it waited (the exception's frames), then it asks
  the parent for every rank's report.

Each report in the stacks file begins with a line `=== <time.time()> <why>`; reports are appended,
never overwritten. On CUDA, NCCL's flight recorder is turned on and dumps beside them on a timeout.
A run that ends cleanly removes the files it made and that hold no report."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import torch

from launcher.cluster import trail

REPORT_SIGNAL = signal.SIGUSR2
SECTION = "=== "
# set for the workers by the process that gathers their reports (the --nproc parent): its pid, which
# a rank whose collective timed out asks for every rank's report (unset: nobody would answer)
REPORTER_ENV = "LAUNCHER_HANG_REPORTER"


def stacks_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.stacks.txt"


def trail_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.collectives.txt"


def turn_on_nccl_flight_recorder(directory: Path) -> None:
    """NCCL's own record of its last collectives, dumped beside the report when one times out (read
    when a process group is created; a user's settings win). torch 2.11 renamed two of the
    variables; the old names still work there, with a warning."""
    if not torch.cuda.is_available():
        return
    renamed = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 11)
    size, dump = ("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE") if renamed else _OLD_NAMES
    if "TORCH_FR_BUFFER_SIZE" not in os.environ and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ[size] = "2000"
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in os.environ:
        os.environ[dump] = str(directory / "nccl_trace_rank_")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


_OLD_NAMES = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


class Armed:
    """This rank's report files, open; `disarm` at the end of the run."""

    def __init__(self, directory: Path, rank: int, on_signal: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.rank = directory, rank
        # the trail is rewritten whole (it describes this run); reports already there are kept
        self._made = [trail_path(directory, rank)] + [p for p in [stacks_path(directory, rank)] if not p.exists()]
        self._stacks: IO[str] = open(stacks_path(directory, rank), "a")  # noqa: SIM115 - open for the run's life
        self._on_signal = on_signal
        if on_signal:
            # ignored underneath: what faulthandler puts back when it lets go, so that a report
            # signal that comes late (the process is leaving) is not its default action, death
            signal.signal(REPORT_SIGNAL, signal.SIG_IGN)
            faulthandler.register(REPORT_SIGNAL, file=self._stacks, all_threads=True, chain=False)
        trail.install(trail.Trail(trail_path(directory, rank), rank))

    def timed_out(self, exc: BaseException) -> None:
        """A collective of this rank timed out: write where it waited, and ask the parent for every
        rank's report (the rank that holds the others up has no timeout of its own)."""
        with contextlib.suppress(OSError):
            frames = _frames(exc.__traceback__)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._stacks.write(f"{SECTION}{time.time():.3f} timed out: {first[:300]}\n")
            self._stacks.write("Timed out here (most recent call first):\n" + "".join(frames) + "\n")
            self._stacks.flush()
        reporter = os.environ.get(REPORTER_ENV, "")
        if reporter.isdigit():
            with contextlib.suppress(OSError):
                os.kill(int(reporter), REPORT_SIGNAL)

    def disarm(self) -> None:
        """Stop recording, and remove the files this run made if no report was written: a run that
        ended (well or on an error of its own) leaves nothing; one killed or hung leaves its trail.
        Later report signals are ignored (this process is leaving)."""
        if self._on_signal:
            faulthandler.unregister(REPORT_SIGNAL)  # back to ignored
        trail.uninstall()
        self._stacks.close()
        with contextlib.suppress(OSError):
            if stacks_path(self.directory, self.rank).stat().st_size == 0:  # no report was asked for
                for made in self._made:
                    made.unlink()
                self.directory.rmdir()  # only if nothing else is in it (the other ranks' files)


@contextlib.contextmanager
def reporting(directory: Path, rank: int, world_size: int, on_signal: bool) -> Iterator[Armed | None]:
    """This rank's hang report, armed for the body (a job of more than one rank); None where it is
    not (one process, or a run directory that cannot be written: the preflight then says so).
    `on_signal`: SIGUSR2 writes the stacks (not when the recipe makes it the preemption signal)."""
    if world_size <= 1:
        yield None
        return
    turn_on_nccl_flight_recorder(directory)
    try:
        armed: Armed | None = Armed(directory, rank, on_signal)
    except OSError:
        armed = None
    try:
        yield armed
    finally:
        if armed is not None:
            armed.disarm()


def _frames(tb: TracebackType | None) -> list[str]:
    """A traceback's frames in faulthandler's format (most recent call first)."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f'  File "{code.co_filename}", line {tb.tb_lineno} in {code.co_name}\n')
        tb = tb.tb_next
    return frames[::-1]
