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


def shows_bars(progress: str) -> bool:
    """Does log.progress (auto, bar or lines) draw bars here? auto: on a terminal only."""
    return progress == "bar" or (progress == "auto" and sys.stdout.isatty())


# Hugging Face libraries' own switches: huggingface_hub's (which transformers follows) and datasets'
LIBRARY_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def route_library_bars(show: bool) -> None:
    """The Hugging Face libraries' bars ("Generating train split", "tokenizing", "Loading weights",
    "Writing model shards") follow the launcher's progress setting: on where it draws bars (the main
    process on a terminal), off elsewhere, where each is a line of carriage returns in a log and every
    rank would draw its own. A user's own HF_*_DISABLE_PROGRESS_BARS wins."""
    if show:
        return
    import os

    for name in LIBRARY_BAR_SWITCHES:
        if name in os.environ:
            return  # the user chose
    for name in LIBRARY_BAR_SWITCHES:
        os.environ[name] = "1"  # read when the libraries are imported (in this process and its workers)
    # and libraries a recipe's components already imported
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.disable_progress_bar()
