"""checkpoint.async_save: a periodic checkpoint's state is copied to host memory while training
waits (staging), then written by a thread while training goes on.

The write itself is the synchronous one (launcher/checkpoint/checkpointer.py), so atomicity is
unchanged: shards and state.pt go into a temporary directory, COMPLETE is written last, and only
then is the directory renamed into place and older ones pruned. A crash during the background
write leaves the previous checkpoint as the newest complete one. One write is in flight at a time:
the next save, and every synchronous one (the final save, a preemption's), waits for it first.

The thread's collectives (DCP's planning, the shard digests, the closing barrier) run on a process
group of their own, so they never interleave with the training loop's collectives on the others.

The price: one more host copy of what the checkpoint holds (pinned memory on CUDA), for as long as
the write takes; and a write error surfaces at the next save, not at the one that failed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch


class BackgroundWrite:
    """The one checkpoint write in flight, and its error, re-raised by `wait` in the training thread."""

    def __init__(self, group: Any = None) -> None:
        self.group = group  # the process group its collectives use (None: one process)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, write: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001  # re-raised where training can act on it
                self._error = e

        # a daemon: a run that fails while a write is in flight exits without it (the previous
        # checkpoint stays the resume point; the temporary directory goes at the next start)
        self._thread = threading.Thread(target=run, name="checkpoint-write", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight (if any) is on disk; its failure is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def settle(self, timeout_s: float) -> None:
        """On the way out after a failure: let the write in flight finish, if it can within
        `timeout_s` (a peer that died may hold its collectives forever), and keep quiet about its
        own error (the run's is the one to report)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread, self._error = None, None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def stage(state: Any) -> Any:
    """A copy of `state` that training cannot change: every tensor copied to host memory (pinned
    where it comes from a GPU), sharded tensors (DTensor) kept sharded with their local pieces
    copied, and containers and other values copied (an optimizer's param_groups change with the
    schedule)."""
    copied = _stage(state)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    return copied


def _stage(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _stage_tensor(value)
    if isinstance(value, dict):
        return {k: _stage(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stage(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_stage(v) for v in value)
    return copy.deepcopy(value)


def _stage_tensor(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "to_local") and hasattr(t, "placements"):  # a DTensor (torch >= 2.6, under FSDP or TP)
        from torch.distributed.tensor import DTensor

        assert isinstance(t, DTensor)
        local = _host_copy(t.to_local())
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return _host_copy(t)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t, non_blocking=True)
