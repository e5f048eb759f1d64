"""Preemption: signals set a flag; the loop acts on it at an optimizer-step boundary.

The handler does nothing but record the signal: no I/O, no locks, nothing that can deadlock when
the signal lands inside a write or a collective. Ranks may receive a signal at different steps, so
they agree before acting: each step every rank contributes its flag to an asynchronous all-reduce
(MAX) on a CPU gloo group, and reads the result of the previous step's. All ranks therefore see the
same decision at the same step, and the check costs no device synchronisation and no wait.
"""
from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class PreemptionFlag:
    """Installs handlers for `signals`; `signum` is the first one received (None before)."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "PreemptionFlag":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class Agreement:
    """Every rank calls `poll(flag)` once per step, in step; returns the agreed decision of the
    previous poll (True if any rank had raised its flag by then)."""

    def __init__(self, group=None):
        self.group = group
        self._work = None
        self._buf: torch.Tensor | None = None

    def poll(self, flag: bool) -> bool:
        if self.group is None:  # a single process agrees with itself, at once
            return flag
        decided = False
        if self._work is not None:
            self._work.wait()
            decided = bool(self._buf.item())  # a CPU tensor: no device sync
        self._buf = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def drain(self) -> None:
        """Complete the outstanding all-reduce so no rank leaves one half-done."""
        if self._work is not None:
            self._work.wait()
            self._work = None
