"""Preemption: signals set a flag; the loop acts on it at an optimizer-step boundary.

The handler does nothing but record the signal: no I/O, no locks, nothing that can deadlock when
the signal lands inside a write or a collective. Ranks may receive a signal at different steps, so
they agree before acting: each step every rank contributes its flag to an asynchronous all-reduce
(MAX) on a CPU gloo group, and reads the result of the previous step's. All ranks therefore see the
same decision at the same step, and the check costs no device synchronisation and no wait.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class PreemptionFlag:
    """Installs handlers for `signals`; `signum` is the first one received (None before).

    SIGINT (Ctrl-C) is one of them: the first checkpoints and stops, like a preemption signal. Any
    stop signal after it, more than SECOND_INTERRUPT_S later, raises KeyboardInterrupt at once: the
    user pressed Ctrl-C again. (A worker of torch's elastic agent, in its own session, gets the
    second press as the SIGTERM with which the agent gives up waiting; one press passed on twice,
    milliseconds apart, as srun may, counts once.)"""

    SECOND_INTERRUPT_S = 0.5

    def __init__(self, signals: list[signal.Signals]):
        self.signals = signals
        self.signum: int | None = None
        self._interrupted_at: float | None = None
        self._previous: dict = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal.signal's signature
        now = time.monotonic()
        if self._interrupted_at is not None and now - self._interrupted_at > self.SECOND_INTERRUPT_S:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self._interrupted_at is None:
            self._interrupted_at = now
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> PreemptionFlag:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class Agreement:
    """Every rank calls `poll(signum)` once per step, in step (0: no signal); returns the agreed
    decision of the previous poll: the largest signal number any rank had received by then, or 0.
    (SIGTERM 15 > SIGUSR1 10 > SIGINT 2: a preemption outranks an interrupt when both arrive.)"""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self._work: dist.Work | None = None
        self._buf: torch.Tensor | None = None

    def poll(self, signum: int) -> int:
        if self.group is None:  # a single process agrees with itself, at once
            return signum
        decided = 0
        if self._work is not None and self._buf is not None:
            self._work.wait()
            decided = int(self._buf.item())  # a CPU tensor: no device sync
        self._buf = torch.tensor([signum], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def drain(self) -> None:
        """Complete the outstanding all-reduce so no rank leaves one half-done."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent (the `launcher run --nproc`
    process that started it) dies, however it dies, so that no worker outlives its launcher and
    races a re-run. Elsewhere nothing happens."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
