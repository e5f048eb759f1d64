"""A thread that says a long-running process is alive (start-up phases, rank 0's first slow step, a
long evaluation)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from launcher.observe.logs import log


class Heartbeat:
    """A thread that says the run is alive when a phase, a step or an evaluation takes long (reading
    and tokenizing data, building or loading a model, a first step on a slow CPU, a long evaluation):
    after `first_s` without progress, then every EVERY_S. It reads attributes the run sets as it goes;
    it never touches the device."""

    STEP_FIRST_S, PHASE_FIRST_S, EVERY_S = 10.0, 5.0, 30.0

    def __init__(self) -> None:
        self.what, self.since, self.next_s = "starting", time.monotonic(), self.STEP_FIRST_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-heartbeat", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def mark(self, what: str, first_s: float = STEP_FIRST_S) -> None:
        self.what, self.since, self.next_s = what, time.monotonic(), first_s

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """A start-up phase (`what`: "reading data.train"): lines while it lasts past PHASE_FIRST_S,
        and how long it took if it was that long; a fast phase prints nothing."""
        self.start()
        self.mark(what, self.PHASE_FIRST_S)
        yield
        took = time.monotonic() - self.since
        if took >= self.PHASE_FIRST_S:
            log.info(f"{what}: done in {took:.0f} s")
        self.mark("starting", float("inf"))

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            elapsed = time.monotonic() - self.since
            if elapsed >= self.next_s:
                log.info(f"{self.what}: still running after {elapsed:.0f} s")
                self.next_s += self.EVERY_S


@contextlib.contextmanager
def phase(heartbeat: Heartbeat | None, what: str) -> Iterator[None]:
    """`heartbeat.phase(what)` on the rank that reports (rank 0); nothing on the others."""
    with heartbeat.phase(what) if heartbeat is not None else contextlib.nullcontext():
        yield
