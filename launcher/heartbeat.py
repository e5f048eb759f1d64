"""A thread that says a long-running process is alive (rank 0's first slow step, a long evaluation)."""

from __future__ import annotations

import threading
import time

from launcher.logs import log


class Heartbeat:
    """A thread that says the run is alive when a step or an evaluation takes long (a first step on a
    slow CPU, a long evaluation): after FIRST_S without progress, then every EVERY_S. It reads two
    attributes the loop sets at each step; it never touches the device."""

    FIRST_S, EVERY_S = 10.0, 60.0

    def __init__(self) -> None:
        self.what, self.since, self.next_s = "starting", time.monotonic(), self.FIRST_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark(self, what: str) -> None:
        self.what, self.since, self.next_s = what, time.monotonic(), self.FIRST_S

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            elapsed = time.monotonic() - self.since
            if elapsed >= self.next_s:
                log.info(f"{self.what}: still running after {elapsed:.0f} s")
                self.next_s += self.EVERY_S
