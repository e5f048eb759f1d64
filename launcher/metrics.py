"""Metric sinks. Only rank 0 writes; the loop calls `log(row)` on every rank."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("launcher")


class JsonlSink:
    """One JSON object per line, flushed per row so a crash loses nothing already logged."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self._f = open(path, "a" if append else "w", encoding="utf-8")

    def __call__(self, row: dict) -> None:
        self._f.write(json.dumps(row, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ConsoleSink:
    """Plain periodic lines, fit for SLURM logs."""

    def __init__(self, total_steps: int):
        self.total = total_steps

    def __call__(self, row: dict) -> None:
        parts = [f"step {row['step']}/{self.total}", f"epoch {row['epoch']}"]
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            parts.append(f"{key} {_fmt(value)}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        pass


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


class Metrics:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def __call__(self, row: dict) -> None:
        for sink in self.sinks:
            sink(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, prefixed with their rank."""
    import sys

    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
