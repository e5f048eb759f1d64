"""Where metrics go. Only rank 0 has sinks; the loop calls `log(row)` and `advance(step)` everywhere.

Sinks: metrics.jsonl (always), the console (a tqdm bar on a terminal, plain lines otherwise, as in
SLURM logs), TensorBoard (log.tensorboard) and wandb (log.wandb, launcher/observe/wandb_log.py).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher.errors import RecipeError
from launcher.observe.logs import LevelFormatter, log, shows_bars
from launcher.storage import atomic_write

if TYPE_CHECKING:
    from launcher.data.plan import Plan
    from launcher.recipe.schema import Recipe


class JsonlSink:
    """One JSON object per line. Each row goes to the file in a single append-mode write, so a crash
    leaves at most a torn last line (which `read_metrics` drops), never rows interleaved or lost."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        try:
            # O_NOFOLLOW: a link is never written through (nor, on a fresh start, its target truncated)
            self._fd = os.open(path, flags | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise RecipeError(
                "run.dir",
                f"{path} is a symbolic link, which the run would write through: remove it, or choose another run.dir",
            ) from None

    def __call__(self, row: dict) -> None:
        data = (json.dumps(row, allow_nan=True) + "\n").encode()
        while data:  # os.write may write less than asked (a signal, a full pipe): finish the row
            data = data[os.write(self._fd, data) :]

    def close(self, ok: bool = True) -> None:  # noqa: ARG002 - a sink's interface; the file ends alike
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The rows of a metrics.jsonl, and how many lines were unreadable (a row torn by a crash)."""
    rows, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


def format_row(row: dict, total_steps: int) -> str:
    parts = [f"step {row['step']}/{total_steps}", f"epoch {row['epoch']}"]
    parts += [f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("step", "epoch")]
    return " | ".join(parts)


class ConsoleSink:
    """Plain periodic lines, fit for SLURM logs."""

    def __init__(self, total_steps: int):
        self.total = total_steps

    def __call__(self, row: dict) -> None:
        log.info(format_row(row, self.total))

    def close(self, ok: bool = True) -> None:
        pass


class ProgressSink:
    """A tqdm bar with loss and throughput; other rows and log messages print above it."""

    def __init__(self, total_steps: int, start_step: int):
        from tqdm import tqdm

        self.total = total_steps
        try:
            sized = os.get_terminal_size(sys.stdout.fileno()).columns > 0
        except OSError:
            sized = False
        # a terminal that reports no size (some ptys, `script`) would hide the bar: assume 100 x 24
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            file=sys.stdout,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 24,
        )
        self._handler = _TqdmHandler(self.bar)
        self._previous = log.handlers[:]
        log.handlers[:] = [self._handler]

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def __call__(self, row: dict) -> None:
        if "loss" in row:
            post = {"loss": f"{row['loss']:.4g}", "samples/s": _fmt(row.get("samples_per_s", math.nan))}
            if "tokens_per_s" in row:
                post["tokens/s"] = _fmt(row["tokens_per_s"])
            self.bar.set_postfix(post, refresh=False)
        else:
            self.bar.write(format_row(row, self.total))

    def close(self, ok: bool = True) -> None:  # noqa: ARG002 - a sink's interface
        self.bar.close()
        log.handlers[:] = self._previous


class _TqdmHandler(logging.Handler):
    def __init__(self, bar: Any) -> None:  # a tqdm bar
        super().__init__()
        self.bar = bar
        self.setFormatter(LevelFormatter(0))

    def emit(self, record: logging.LogRecord) -> None:
        # above the bar; warnings to stderr, as without a bar
        self.bar.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


class TensorBoardSink:
    def __init__(self, directory: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from launcher.errors import RecipeError

            raise RecipeError(
                "log.tensorboard", "needs the tensorboard package: pip install 'launcher[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(directory), purge_step=start_step or None)

    def __call__(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=row["step"])

    def close(self, ok: bool = True) -> None:  # noqa: ARG002 - a sink's interface
        self.writer.close()


def _fmt(v: object) -> str:
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

    def advance(self, step: int) -> None:
        for sink in self.sinks:
            if hasattr(sink, "advance"):
                sink.advance(step)

    def close(self, ok: bool = True) -> None:
        for sink in self.sinks:
            sink.close(ok)


# Dense peak FLOP/s per GPU, for MFU: (bf16/fp16, tf32, fp32). NVIDIA's datasheets, SXM parts.
PEAK_FLOPS = {
    "H200": (989e12, 494e12, 67e12),
    "H100": (989e12, 494e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10G": (70e12, 35e12, 31.2e12),
    "V100": (125e12, 15.7e12, 15.7e12),
}


class LoggerIds(dict):
    """Ids of external loggers (the wandb run id), kept in checkpoints so that a resumed run logs to
    the same run (Stateful)."""

    def state_dict(self) -> dict[str, Any]:
        return dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.update(state_dict)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_FLOPS.items():
        if key in name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def build_sinks(
    recipe: Recipe, plan: Plan, step: int, logger_ids: LoggerIds, resumed: bool, continuing: bool
) -> Metrics:
    """The main process's sinks. `resumed`: from a checkpoint (at `step`); `continuing`: the same run
    (resumed or restarted)."""
    layout = recipe.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.config, lambda f: f.write(recipe.to_yaml().encode()))
    path = layout.metrics
    if resumed and path.exists():
        # continue the history: rows past the checkpoint were trained again and are logged again;
        # a row torn by a crash mid-write is dropped (and rewritten when its step is trained again)
        rows, torn = read_metrics(path)
        if torn:
            log.warning(f"{path}: dropped {torn} incomplete line(s) left by an interrupted write")
        kept = [json.dumps(r, allow_nan=True) for r in rows if r.get("step", 0) <= step]
        atomic_write(path, lambda f: f.write("".join(r + "\n" for r in kept).encode()))
    sinks: list[Any] = [JsonlSink(path, append=resumed)]
    if shows_bars(recipe.log.progress):
        sinks.append(ProgressSink(plan.total_steps, step))
    else:
        sinks.append(ConsoleSink(plan.total_steps))
    if recipe.log.tensorboard:
        sinks.append(TensorBoardSink(layout.root / "tensorboard", step))
    if recipe.log.wandb is not None:
        from launcher.observe import wandb_log

        run_id = wandb_log.run_id(layout.root, logger_ids.get("wandb"), continuing)
        logger_ids["wandb"] = run_id
        sinks.append(wandb_log.WandbSink(recipe, layout.root, run_id))
    return Metrics(sinks)
