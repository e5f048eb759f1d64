"""The launcher's logger and its set-up: information to stdout, warnings and errors to stderr, marked
with their level (and, off rank 0, the rank)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("launcher")


class LevelFormatter(logging.Formatter):
    """Info as the bare message; warnings and errors marked with their level (and the rank, off rank 0)."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{self.prefix}{record.levelname.lower()}: {message}"
        return f"{self.prefix}{message}"


class _StdoutBelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, prefixed with their rank.
    Information goes to stdout; warnings and errors to stderr, marked `warning:` / `error:`."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_StdoutBelowWarning())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(LevelFormatter(rank))
    log.handlers[:] = [out, err]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
