"""Helpers the test modules share (so that no test module imports another): processes by marker,
free ports, a resumable recipe whose model can be parked mid-run, and exact weight comparison."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import recipe_dict, worker_env

# dropout and per-sample noise make every RNG stream matter; 37 samples and global batch 16 make
# each epoch's last window partial (3 steps per epoch, 9 in all)
RESUMABLE = {
    "model": {"_component_": "testkit.GatedMLP", "sizes": [8, 16, 16, 1], "dropout": 0.1},
    "data.train": {"_component_": "testkit.NoisyRegression", "size": 37},
    "scheduler": {"_component_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 9},
    "train.warmup_steps": 2,
    "train.epochs": 3,
}


def recipe(run_dir: Path, **changes) -> dict:
    """The resumable recipe, writing to `run_dir`, with dotted-key changes."""
    return recipe_dict(**{**RESUMABLE, "run.dir": str(run_dir), **changes})


def gate(tmp_path: Path, rank: int, at_call: int, **extra) -> tuple[Path, Path, dict]:
    """(until, waiting, changes): the model parks `rank` at forward call `at_call`, creating
    `waiting` (holding its pid), until the file `until` exists."""
    until, waiting = tmp_path / "release", tmp_path / "waiting"
    return (
        until,
        waiting,
        {
            "model": {
                **RESUMABLE["model"],
                "rank": rank,
                "at_call": at_call,
                "until": str(until),
                "waiting": str(waiting),
                **extra,
            }
        },
    )


def start(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m launcher ARGS`, running (stdout and stderr piped, as text): for tests that act on it."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *map(str, args)],
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc, limit_s: float = 120) -> None:
    """Wait for `path` to appear while `proc` runs (a limit, not a timing: failing means it never came)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries `marker` (our workers and their children)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max():.3g}"
