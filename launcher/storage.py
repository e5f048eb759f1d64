"""Files that are either whole or absent: atomic writes, durable renames, modes that follow the
umask, and one-line errors for a full disk. Everything the launcher writes goes through here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from launcher.errors import TrainingError


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


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
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


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, atomically (the final weights, model.pt)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def fsync_dir(directory: Path) -> None:
    # a rename is durable only once the directory entry is on disk
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def write_failed(path: Path, exc: BaseException) -> TrainingError:
    """A failed checkpoint write (disk full, quota, I/O error): one line naming the path and the free space."""
    return TrainingError(f"{why_write_failed(path, exc)}; the previous checkpoint is intact")


def why_write_failed(path: Path, exc: BaseException) -> str:
    """A failed write as a phrase naming the path, the reason and the free space there."""
    try:
        free: int | None = free_bytes(path)
    except OSError:
        free = None
    reason = getattr(exc, "strerror", None)
    if reason is None:
        # torch.save reports a full disk from C++ ("[enforce fail at inline_container.cc] unexpected pos")
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        reason = "No space left on device" if free is not None and free < 2**20 else text
    room = f"{free / 2**20:,.1f} MiB free there" if free is not None else "free space unknown"
    return f"writing {path} failed: {reason} ({room})"
