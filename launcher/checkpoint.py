"""Checkpoints: atomic writes, exact resume state, safe loading.

Layout: <dir>/step_00000120/state.pt plus <dir>/step_00000120/COMPLETE. A checkpoint is written
into a hidden temporary directory (file fsynced), the COMPLETE marker (size and sha256 of
state.pt) is written last, and only then is the directory renamed into place. A crash at any moment
therefore leaves every earlier checkpoint untouched and loadable, and a half-written one invisible.
Loading uses torch.load(weights_only=True): a checkpoint cannot run code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from launcher.errors import RecipeError
from launcher.logs import log
from launcher.rundir import write_failed

STATE, MARKER = "state.pt", "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)$")


# ---------------------------------------------------------------- atomic files


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Files and directories the launcher writes follow the umask, as `open()` and `mkdir` would: the
# temporary files behind atomic writes are created 0600 by mkstemp and are widened to this.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file in the same directory, fsync it, then rename it over `path`.
    A failed write (disk full, I/O error) leaves `path` as it was and raises one line naming it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_failed(path, e) from None
        raise
    fsync_dir(path.parent)


def save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def fsync_dir(directory: Path) -> None:
    # a rename is durable only once the directory entry is on disk
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """This process's RNG streams, as tensors and plain values (weights_only-loadable)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        s = np.random.get_state(legacy=False)
        state["numpy"] = {"bit_generator": s["bit_generator"], "key": torch.from_numpy(s["state"]["key"].astype("int64")),
                          "pos": int(s["state"]["pos"]), "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                             "state": {"key": n["key"].numpy().astype("uint32"), "pos": n["pos"]}})


# ---------------------------------------------------------------- checkpoint directories


def write_checkpoint(directory: Path, step: int, payload: dict[str, Any], summary: dict[str, Any] | None = None) -> Path:
    """Write <directory>/step_<step> atomically; returns its path. A failed write (disk full)
    removes the partial directory and raises one line naming the path and the free space.
    `summary`: small facts kept in the COMPLETE marker too, readable without loading state.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".step_{step:08d}.", suffix=".tmp"))
    try:
        os.chmod(tmp, DIR_MODE)
        state_path = tmp / STATE
        with open(state_path, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        _crash_point("after-state")
        marker = {"step": step, "bytes": state_path.stat().st_size, "sha256": _sha256(state_path), "time": time.time(),
                  **(summary or {})}
        atomic_write(tmp / MARKER, lambda f: f.write(json.dumps(marker).encode()))
        if final.exists():  # an earlier attempt at this very step (e.g. before a restart): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise write_failed(final, e) from None
        raise
    fsync_dir(directory)
    return final


def _crash_point(name: str) -> None:
    """Tests kill the process at a chosen point of a checkpoint write (deterministically, not by a
    race): LAUNCHER_TEST_CRASH_AT=after-state dies between state.pt and the COMPLETE marker."""
    if os.environ.get("LAUNCHER_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def read_marker(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of a verified checkpoint directory: its step, time and summary."""
    return json.loads((path / MARKER).read_text())


def verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and intact, else what is wrong with it."""
    marker_path, state_path = path / MARKER, path / STATE
    if not marker_path.is_file():
        return "incomplete (no COMPLETE marker: the write was interrupted)"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable marker ({e})"
    if not state_path.is_file():
        return f"{STATE} is missing"
    if state_path.stat().st_size != marker.get("bytes"):
        return f"{STATE} has {state_path.stat().st_size} bytes, the marker says {marker.get('bytes')}"
    if _sha256(state_path) != marker.get("sha256"):
        return f"{STATE} is corrupt (sha256 differs from the marker's)"
    return None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest step first (complete or not)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def find_latest(directory: Path, warn: bool = True) -> Path | None:
    """The newest complete, intact checkpoint; damaged ones are skipped (with a warning if `warn`)."""
    for path in list_checkpoints(directory):
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            log.warning(f"skipping checkpoint {path}: {problem}")
    return None


def resolve_resume(resume: str, directory: Path, warn: bool = True) -> Path | None:
    """`checkpoint.resume` -> the checkpoint directory to load, or None to start fresh. `warn`:
    report skipped damaged checkpoints (one process of the job says it, not every rank)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(directory, warn)
    path = Path(resume).expanduser()
    if path.is_file() and path.name == STATE:
        path = path.parent
    if path.is_dir() and not (path / MARKER).exists() and list_checkpoints(path):
        latest = find_latest(path, warn)  # a directory of checkpoints: its newest
        if latest is None:
            raise RecipeError("checkpoint.resume", f"{path} holds no complete, intact checkpoint")
        return latest
    if not path.exists():
        existing = [p.name for p in list_checkpoints(path.parent if path.parent.is_dir() else directory)]
        where = path.parent if path.parent.is_dir() and existing else directory
        have = f"; {where} holds {', '.join(existing[:5])}" if existing else ""
        raise RecipeError("checkpoint.resume", f"{path} does not exist (checkpoint.keep_last may have deleted it){have}; "
                                               "use one of those, auto, or none")
    is_checkpoint = path.is_dir() and ((path / STATE).exists() or (path / MARKER).exists())
    problem = verify(path) if is_checkpoint else f"not a checkpoint directory (expected step_N/ with {STATE} and {MARKER})"
    if problem:
        raise RecipeError("checkpoint.resume", f"{path}: {problem}")
    return path


def load(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def prune(directory: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and leftover temp dirs."""
    complete = [p for p in list_checkpoints(directory) if (p / MARKER).exists()]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def check_model_matches(model_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor], source: Path) -> None:
    """One clear error listing what differs, rather than load_state_dict's wall of text."""
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    shapes = [f"{k} {tuple(ckpt_state[k].shape)} vs model {tuple(v.shape)}" for k, v in model_state.items()
              if k in ckpt_state and tuple(ckpt_state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_few(shapes)}")
        raise RecipeError("checkpoint.resume", f"{source} was saved from a different model: {'; '.join(parts)}; "
                                               "resume with the recipe that wrote it, or set checkpoint.resume=none")


def _few(items: list[str], n: int = 4) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "") + "]"
