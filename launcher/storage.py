"""Files that are either whole or absent: atomic writes, durable renames, modes that follow the
umask, and one-line errors for a full disk. Everything the launcher writes goes through here."""

from __future__ import annotations

import contextlib
import errno
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
    tmp = None
    try:
        # in the try: a directory made read-only (or full) since the run started is one line too
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # the reason first: a full disk has room again once the partial file is removed
        failed = write_failed(path, e) if isinstance(e, (OSError, RuntimeError)) else None
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if failed is not None:
            raise failed from None
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


def write_failed(path: Path, exc: BaseException, after: str = "") -> TrainingError:
    """A failed write (disk full, quota, a read-only directory, I/O error): one line naming the path,
    the reason and the free space, then `after` (what is left, say)."""
    return TrainingError(f"{why_write_failed(path, exc)}{after}")


# a write that ran out of room: the disk, or the user's quota
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def why_write_failed(path: Path, exc: BaseException) -> str:
    """A failed write as a phrase naming the path, the reason and the free space there. Call it before
    removing what the write left: a full disk has room again once its partial file is gone."""
    try:
        free: int | None = free_bytes(path)
    except OSError:
        free = None
    os_error = os_error_in(exc)
    if (os_error is not None and os_error.errno in _NO_SPACE) or (
        os_error is None and free is not None and free < 2**20
    ):
        # torch.save reports a full disk from C++ without an errno ("[enforce fail at
        # inline_container.cc] unexpected pos"); DCP wraps each rank's failure in its own exception
        reason = f"no space left on {nearest_existing(path.parent)}"
    elif os_error is not None and os_error.strerror:
        reason = os_error.strerror
        if os_error.filename and Path(os_error.filename) != path:
            # a temporary file or directory of the write: the directory it was made in says where
            where = Path(os_error.filename)
            reason += f" in {where.parent if where.name.endswith('.tmp') else where}"
    else:
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
    room = f"{free / 2**20:,.1f} MiB free there" if free is not None else "free space unknown"
    return f"writing {path} failed: {reason} ({room})"


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, its cause or context, or one rank's failure inside DCP's
    CheckpointException (whose `failures` maps each rank to (exception, traceback))."""
    seen: list[object] = [exc]
    visited: set[int] = set()
    while seen:
        e = seen.pop()
        if isinstance(e, tuple) and e:
            e = e[0]
        if not isinstance(e, BaseException) or id(e) in visited:
            continue
        visited.add(id(e))
        if isinstance(e, OSError):
            return e
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            seen += list(failures.values())
    return None
