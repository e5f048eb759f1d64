"""The parent's side of the hang report (`launcher run --nproc`): ask every rank for its report
(cluster/hang.py), then read the reports and say, in a few lines, which ranks are behind and where,
and whether the ranks wait in different collectives (a mismatch) or for a slow or dead peer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.cluster import hang, trail
from launcher.cluster.hang import REPORT_SIGNAL

VERDICT = "verdict.txt"
WAIT_FOR_REPORTS_S = 5.0  # each live rank writes its stacks at once, from a signal handler
_FRAME = re.compile(r'\s*File "(.*)", line (\d+) in (.*)')
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
# not "the line a rank is on": torch, Python's own modules, and the launcher's collective plumbing
_PLUMBING = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # launcher/cluster
)


def _ranks_in(directory: Path) -> dict[int, Path]:
    found = {}
    for path in directory.glob("rank*.collectives.txt"):
        rank = path.name.removeprefix("rank").partition(".")[0]
        if rank.isdigit():
            found[int(rank)] = path
    return found


def ask(directory: Path) -> dict[int, int]:
    """Send the report signal to each rank that is a child of this process and has armed its report
    (its trail names its pid): {rank: size of its stacks file before it answers}."""
    asked = {}
    for rank, path in sorted(_ranks_in(directory).items()):
        pid = trail.read(path).pid
        if pid is None or _parent_of(pid) != os.getpid():
            continue  # not one of ours (a previous run's), or gone
        stacks = hang.stacks_path(directory, rank)
        with contextlib.suppress(OSError), open(stacks, "a") as f:
            f.write(f"{hang.SECTION}{time.time():.3f} asked for\n")
        with contextlib.suppress(OSError):
            asked[rank] = stacks.stat().st_size
            os.kill(pid, hang.REPORT_SIGNAL)
    return asked


def wait_for(directory: Path, asked: dict[int, int], limit_s: float = WAIT_FOR_REPORTS_S) -> None:
    """Until every asked rank has written its stacks, or cannot (stopped, gone), or `limit_s`."""
    deadline = time.monotonic() + limit_s
    waiting = dict(asked)
    while waiting and time.monotonic() < deadline:
        for rank, size in list(waiting.items()):
            pid = trail.read(hang.trail_path(directory, rank)).pid
            with contextlib.suppress(OSError):
                if hang.stacks_path(directory, rank).stat().st_size > size or _state(pid) in ("stopped", "gone"):
                    del waiting[rank]
        time.sleep(0.05)


# ---------------------------------------------------------------- reading a rank's report


@dataclass(frozen=True)
class Where:
    at: str  # file:line
    fn: str

    def __str__(self) -> str:
        return f"{_short(self.at)} in {self.fn}"


@dataclass(frozen=True)
class RankReport:
    rank: int
    state: str  # running | stopped | gone
    current: trail.Entry | None  # the recorded collective it is in, or timed out in
    last: trail.Entry | None  # its last recorded collective
    timed_out_at: Where | None  # where a collective of its own timed out (recorded or not)
    now_at: Where | None  # the line its main thread was on when it answered

    @property
    def waits(self) -> bool:
        return self.current is not None or self.timed_out_at is not None

    def describe(self) -> str:
        if self.current is not None:
            how = "timed out" if self.current.state == "timed out" else "waits"
            return f"{how} in {self.current.describe()}, called at {_short(self.current.at)} in {self.current.fn}"
        if self.timed_out_at is not None:
            return f"timed out at {self.timed_out_at} (in a collective the launcher does not record: DDP's, say)"
        last = f"; its last collective: {self.last.describe()}, {self.last.state}" if self.last else ""
        if self.now_at is not None:
            return f"not in a collective, at {self.now_at}{last}"
        if self.state == "stopped":
            return f"stopped (SIGSTOP or SIGTSTP): it cannot answer{last}"
        why = "gone" if self.state == "gone" else "stuck in C code that holds the interpreter, or not started"
        return f"did not answer ({why}){last}"

    def called_at(self) -> str:
        return f", called at {_short(self.current.at)} in {self.current.fn}" if self.current is not None else ""

    def key(self) -> str:
        """Which collective it waits in, as comparable across ranks."""
        if self.current is not None:
            return f"{self.current.op} #{self.current.seq} on {self.current.group}"
        return f"a collective at {self.timed_out_at}"


def read_report(directory: Path, rank: int, since: float, state: str | None = None) -> RankReport:
    """`state`: the process's as seen when it was asked (it may have been stopped for good since)."""
    recorded = trail.read(hang.trail_path(directory, rank))
    entries = [e for e in recorded.entries if e.t >= since]
    current = entries[-1] if entries and entries[-1].state in trail.IN_COLLECTIVE else None
    timed_out_at, now_at = None, None
    for stamp, why, frames in _sections(hang.stacks_path(directory, rank)):
        if stamp < since:
            continue
        if why.startswith("timed out"):
            timed_out_at = _our_line(frames[0]) if frames else None
        else:  # the latest answer only: a rank that did not answer this time is not where it was
            now_at = _our_line(frames[-1]) if frames else None  # faulthandler lists the main thread last
    state = state or _state(recorded.pid)
    return RankReport(rank, state, current, entries[-1] if entries else None, timed_out_at, now_at)


def _sections(path: Path) -> list[tuple[float, str, list[list[tuple[str, str]]]]]:
    """(time, why, threads) of each report in a stacks file; a thread is its frames, innermost first."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    sections: list[tuple[float, str, list[list[tuple[str, str]]]]] = []
    for line in lines:
        if line.startswith(hang.SECTION):
            stamp, _, why = line.removeprefix(hang.SECTION).partition(" ")
            with contextlib.suppress(ValueError):
                sections.append((float(stamp), why, []))
        elif sections and (line.startswith(("Thread ", "Current thread ", "Timed out here"))):
            sections[-1][2].append([])
        elif sections and sections[-1][2] and (m := _FRAME.match(line)):
            sections[-1][2][-1].append((f"{m.group(1)}:{m.group(2)}", m.group(3)))
    return sections


def _our_line(frames: list[tuple[str, str]]) -> Where | None:
    """The innermost frame of the user's or the launcher's code (not torch's, Python's or the
    collective plumbing's); the innermost frame if there is none."""
    for at, fn in frames:
        path = at.rpartition(":")[0]
        library = path.startswith(_STDLIB) and "-packages" not in path
        if not (library or path.startswith(_PLUMBING) or path.startswith("<")):
            return Where(at, fn)
    return Where(*frames[0]) if frames else None


def _short(at: str) -> str:
    """A path relative to the working directory where it is under it."""
    with contextlib.suppress(ValueError):
        return str(Path(at).relative_to(Path.cwd()))
    return at


def _state(pid: int | None) -> str:
    if pid is None:
        return "unknown"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "gone"
    return "stopped" if state in ("T", "t") else "gone" if state in ("Z", "X") else "running"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------- the verdict


def verdict(directory: Path, world_size: int, since: float, states: dict[int, str] | None = None) -> list[str]:
    """A few lines: where each rank is, then which are behind, or that the ranks wait in different
    collectives (a mismatch). Empty if no rank left a report since `since`. `states`: each rank's
    process as seen when it was asked."""
    reports = [read_report(directory, rank, since, (states or {}).get(rank)) for rank in range(world_size)]
    if not any(r.waits or r.now_at for r in reports):
        return []
    lines = [f"hang report (every rank's stacks and last collectives are in {directory}):"]
    lines += [f"  rank {r.rank}: {r.describe()}" for r in reports]
    waiting = [r for r in reports if r.waits]
    behind = [r for r in reports if not r.waits]
    if not waiting:
        lines.append("  no rank waits in a collective the launcher records")
        return lines
    if behind:
        names = "; ".join(f"rank {r.rank} ({_behind_where(r)})" for r in behind)
        lines.append(f"  behind: {names}; the others wait for it (a slow, stuck or dead peer)")
        return lines
    if len({r.key() for r in waiting}) > 1:
        names = "; ".join(f"rank {r.rank} in {r.key()}{r.called_at()}" for r in waiting)
        lines.append(f"  the ranks wait in different collectives (a mismatch): {names}")
        return lines
    lines.append(f"  every rank waits in the same collective ({waiting[0].key()}): a slow or dead peer or network")
    return lines


def _behind_where(r: RankReport) -> str:
    if r.now_at is not None:
        return f"at {r.now_at}"
    return "stopped" if r.state == "stopped" else "no answer"


class Reporter:
    """The parent's hang reports for one launch, from its creation to `uninstall`: SIGUSR2 asks every
    rank for its report, then prints the verdict, unless a rank timed out: the run is then ending, and
    `final` gives the verdict to print last. Without a `directory`, it does nothing."""

    def __init__(self, directory: Path | None, world_size: int, print_line: Callable[[str], None]) -> None:
        self.directory, self.world_size = directory or Path(), world_size
        self.since = time.time()
        self._print = print_line
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._states: dict[int, str] = {}  # each rank's process when last asked: running, stopped
        self._previous = signal.signal(REPORT_SIGNAL, self.on_signal) if directory is not None else None
        if directory is not None:
            os.environ[hang.REPORTER_ENV] = str(os.getpid())  # the workers' timeouts ask here

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(REPORT_SIGNAL, self._previous)
            os.environ.pop(hang.REPORTER_ENV, None)

    def on_signal(self, _signum: int, _frame: object) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # a round is under way: it answers this request too
        self._thread = threading.Thread(target=self._answer, name="launcher-hang-report", daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        with self._lock:
            asked = ask(self.directory)
            if not asked:
                self._print("hang report: no worker can report yet (they are starting, or have ended)")
                return
            wait_for(self.directory, asked)
            self._states = {rank: _state(trail.read(hang.trail_path(self.directory, rank)).pid) for rank in asked}
            if not self._timed_out():  # else the run is ending: its verdict comes last (`final`)
                for line in self._verdict():
                    self._print(line)

    def final(self) -> list[str]:
        """At the end of a failed run: the verdict, if a rank's collective timed out."""
        if self._previous is None:
            return []
        if self._thread is not None:
            self._thread.join(WAIT_FOR_REPORTS_S * 2)
        with self._lock:
            return self._verdict() if self._timed_out() else []

    def _verdict(self) -> list[str]:
        """The verdict, also kept beside the reports (appended: `verdict.txt`)."""
        lines = verdict(self.directory, self.world_size, self.since, self._states)
        if lines:
            with contextlib.suppress(OSError), open(self.directory / VERDICT, "a") as f:
                f.write(f"{hang.SECTION}{time.time():.3f}\n" + "\n".join(lines) + "\n")
        return lines

    def _timed_out(self) -> bool:
        reports = [read_report(self.directory, rank, self.since) for rank in range(self.world_size)]
        return any(r.timed_out_at is not None or (r.current and r.current.state == "timed out") for r in reports)
