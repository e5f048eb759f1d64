"""The run directory: its layout, the checks before a run writes anything, its lock, and what a
fresh start may delete.

Layout of <run.dir>: config.yaml, metrics.jsonl, model.pt, hf/ (a transformers model's
save_pretrained), startup.json, wandb_run_id, .lock, checkpoints/ (unless checkpoint.dir points
elsewhere; it holds a .lock too), profile/, tensorboard/, wandb/.

Policies:
- Nothing outside what the launcher itself writes is ever deleted. `run.overwrite` deletes only
  checkpoint directories of the launcher's own shape (step_N/ holding state.pt and COMPLETE) and
  its own temporary files; a checkpoint directory holding anything else is refused.
- One run at a time in every directory a run writes: the process that writes (rank 0) holds an
  exclusive `flock` on <run.dir>/.lock and on <checkpoint.dir>/.lock for the whole run, so a second
  run that shares either directory (another run.dir, the same checkpoint.dir) is refused. The kernel
  releases them when the process dies, however it dies. A `.lock` that is a link or a directory is
  refused (opened with O_NOFOLLOW: the launcher never writes through a link it did not make).
- A checkpoint directory is shared by one run at a time: a step directory whose COMPLETE marker
  names another run.dir is never replaced, pruned or deleted by run.overwrite.
- Every path the run will write is checked before the first step: a file where a directory must be,
  a directory that cannot be written, a disk too full for one checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from launcher.checkpoint import step_dirs
from launcher.errors import RecipeError
from launcher.observe.logs import log
from launcher.storage import free_bytes, nearest_existing

LOCK = ".lock"
# what a launcher checkpoint directory holds
CHECKPOINT_FILES = frozenset({step_dirs.STATE, step_dirs.MARKER, step_dirs.SHARDS})  # shards/: a sharded run's
_STEP_DIR = re.compile(r"step_\d+$")
_STEP_TMP = re.compile(r"\.step_\d+\..*\.tmp$")


@dataclass(frozen=True)
class RunDir:
    root: Path
    checkpoints: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def weights(self) -> Path:
        return self.root / "model.pt"

    @property
    def hf_model(self) -> Path:
        """The final weights of a transformers model, as save_pretrained writes them (with model.peft:
        the adapter, which peft's from_pretrained loads)."""
        return self.root / "hf"

    @property
    def hf_merged(self) -> Path:
        """With model.peft: the adapters merged into the base model, for from_pretrained without peft."""
        return self.root / "hf-merged"

    @property
    def startup(self) -> Path:
        return self.root / "startup.json"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    @property
    def lock_files(self) -> tuple[tuple[Path, str], ...]:
        """Every lock the run holds, with the key that names its directory: run.dir's, and
        checkpoint.dir's (also where it is the default <run.dir>/checkpoints: another run may name
        it as its checkpoint.dir)."""
        ckpt_key = "checkpoint.dir" if self.checkpoints.parent != self.root else "run.dir"
        locks = ((self.lock_file, "run.dir"), (self.checkpoints / LOCK, ckpt_key))
        return tuple((path, key) for i, (path, key) in enumerate(locks) if not _same_file(path, locks[:i]))

    @property
    def owner(self) -> str:
        """How the markers of this run's checkpoints name the run that wrote them."""
        return str(self.root.resolve())

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Files whose presence means a previous run wrote here."""
        return self.metrics, self.weights

    # ------------------------------------------------------------ checks before anything is written

    def problems(self) -> list[tuple[RecipeError, bool]]:
        """What stops the run from writing where it must: (error, certain). Not certain: the
        directory cannot be written from here, which may differ on the machine that runs it."""
        found: list[tuple[RecipeError, bool]] = []
        ckpt_key = "checkpoint.dir" if self.checkpoints.parent != self.root else "run.dir"
        for path, key in ((self.root, "run.dir"), (self.checkpoints, ckpt_key)):
            try:
                check_writable_dir(path, key)
            except _NotWritable as e:
                found.append((e, False))
            except RecipeError as e:
                found.append((e, True))
        for path, key in self.lock_files:
            if path.is_symlink() or (path.exists() and not path.is_file()):
                found.append((_not_a_lock(path, key), True))
        if self.metrics.is_symlink():  # appended to in place (and emptied by a fresh start): never through a link
            why = "which the run would write through: remove it, or choose another run.dir"
            found.append((RecipeError("run.dir", f"{self.metrics} is a symbolic link, {why}"), True))
        for export in (self.hf_model, self.hf_merged):
            if export.is_symlink():
                why = "the run replaces it with its exported model and never writes through a link"
                fix = "remove the link (what it points to stays) or choose another run.dir"
                found.append((RecipeError("run.dir", f"{export} is a symbolic link; {why}: {fix}"), True))
        return found

    def preflight(self) -> None:
        """Raise a one-line RecipeError if the run could not write where it must."""
        for error, _ in self.problems():
            raise error

    def space_warning(self, bytes_needed: int) -> str | None:
        """A warning if the checkpoint directory's filesystem has less room than `bytes_needed`."""
        try:
            free = free_bytes(self.checkpoints)
        except OSError:
            return None
        if free >= bytes_needed:
            return None
        return (
            f"{self.checkpoints} has {free / 2**20:,.1f} MiB free, less than the {bytes_needed / 2**20:,.1f} MiB "
            "a checkpoint and the final weights need (weights and two optimizer moments per parameter)"
        )

    # ------------------------------------------------------------ fresh starts

    def foreign_checkpoint_entries(self) -> list[Path]:
        """What in the checkpoint directory this run did not write (and so must never delete): anything
        but the launcher's checkpoints and lock, and checkpoints whose marker names another run.dir."""
        if not self.checkpoints.is_dir():
            return []
        foreign = []
        for entry in sorted(self.checkpoints.iterdir()):
            if _STEP_TMP.match(entry.name) and entry.is_dir():
                continue
            if entry.name == LOCK and entry.is_file() and not entry.is_symlink():
                continue
            if (
                _STEP_DIR.match(entry.name)
                and entry.is_dir()
                and not entry.is_symlink()
                and {p.name for p in entry.iterdir()} <= CHECKPOINT_FILES
                and step_dirs.written_by_another(entry, self.owner) is None
            ):
                continue
            foreign.append(entry)
        return foreign

    def clear_checkpoints(self) -> None:
        """run.overwrite: delete this launcher's checkpoints, and nothing else."""
        foreign = self.foreign_checkpoint_entries()
        if foreign:
            others = sorted({o for p in foreign if (o := step_dirs.written_by_another(p, self.owner)) is not None})
            what = (
                f"the checkpoints of another run ({', '.join(others)})"
                if others
                else "files the launcher did not write"
            )
            raise RecipeError(
                "checkpoint.dir",
                f"{self.checkpoints} also holds {what} "
                f"({', '.join(p.name for p in foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "run.overwrite deletes only this run's checkpoints: point checkpoint.dir at a "
                "directory of its own",
            )
        if not self.checkpoints.is_dir():
            return
        for entry in self.checkpoints.iterdir():
            if entry.name != LOCK:  # held by this run
                shutil.rmtree(entry)
        if self.checkpoints != self.root:
            with contextlib.suppress(OSError):
                self.checkpoints.rmdir()  # ours only if now empty

    def remove_stale_temporaries(self) -> None:
        """Temporary files of atomic writes that a killed run left behind (`.model.pt.x1y2.tmp`)."""
        names = [p.name for p in (self.config, self.metrics, self.weights, self.startup)] + ["wandb_run_id"]
        for name in names:
            for leftover in self.root.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        for export in (self.hf_model, self.hf_merged):
            for leftover in self.root.glob(f".{export.name}.*.tmp"):  # a killed hf/ export
                shutil.rmtree(leftover, ignore_errors=True)
        if self.checkpoints.is_dir():
            for leftover in self.checkpoints.iterdir():
                if _STEP_TMP.match(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)

    def prepare(
        self,
        resume: str,
        overwrite: bool,
        restart_count: int = 0,
        act: bool = True,
        check: Callable[[Path], str | None] = step_dirs.verify,
    ) -> Path | None:
        """Decide where the run starts: the checkpoint to resume (`checkpoint.resume`), or None for a
        fresh start. A fresh start over a previous run's outputs needs `overwrite` (which then
        deletes its checkpoints, and only those); a worker restarted by torchrun or a SLURM requeue
        is the same run and may start over. `act`: this is the process that writes (the main
        worker): it cleans up and warns. Others only validate: the parent of `--nproc` workers, and
        the other ranks, which must refuse exactly what the main one refuses. `check` verifies a
        checkpoint (the ranks of a job: step_dirs.verify_together). Call `preflight` first."""
        if act:
            self.remove_stale_temporaries()
        resume_from = step_dirs.resolve_resume(resume, self.checkpoints, warn=act, check=check)
        if resume_from is not None or restart_count > 0:
            return resume_from
        checkpoints = step_dirs.list_checkpoints(self.checkpoints)
        # a run that trained no step and saved nothing (it crashed at start) holds nothing to protect
        found = [str(p) for p in self.outputs if p.exists() and (p != self.metrics or _logged_a_step(p))]
        found += [str(p) for p in checkpoints[:1]]
        if not found and self.metrics.exists() and act:
            log.warning(f"the last run in {self.root} ended before its first step and saved nothing; starting afresh")
        if found and not overwrite:
            how = "resume it with checkpoint.resume=auto, " if resume == "none" and checkpoints else ""
            raise RecipeError(
                "run.dir",
                f"{self.root} already holds a run ({', '.join(found)}); {how}choose another "
                f"run.dir=..., or start over with run.overwrite=true",
            )
        if found and (act or self.foreign_checkpoint_entries()):
            # a fresh start must never resume an older run's state; every rank refuses a foreign directory alike
            self.clear_checkpoints()
        return None

    # ------------------------------------------------------------ one run at a time

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the locks of every directory the run writes, or raise naming the process that holds one."""
        self.preflight()  # before the lock file makes the directory: a file in the way is named as such
        with contextlib.ExitStack() as held:
            for path, key in self.lock_files:
                held.enter_context(acquire_lock(path, key, self.root))  # closing it releases the flock
            yield

    def check_unlocked(self) -> None:
        """Fail now if another run holds a lock (without keeping it: the workers take it)."""
        for path, key in self.lock_files:
            if os.path.lexists(path):
                acquire_lock(path, key, self.root).close()


def _logged_a_step(metrics: Path) -> bool:
    """Does the metrics log hold a training row (read up to the first one)?"""
    with contextlib.suppress(OSError), metrics.open(encoding="utf-8", errors="replace") as f:
        return any('"step"' in line for line in f)
    return False


def acquire_lock(path: Path, key: str = "run.dir", run_dir: Path | None = None) -> IO[str]:
    """Take the exclusive lock `path` (made if missing), writing who holds it; or raise naming the
    holder. `key` names the directory's recipe key; `run_dir`: the run taking it, written beside its pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_NOFOLLOW: a link is refused, never written through; O_NONBLOCK: a FIFO cannot hang the open
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_a_lock(path, key) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(path, key)
    handle = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise
        raise RecipeError(
            key, f"{path.parent} is in use by {holder}; wait for that run to end, or choose another {key}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}{f' (run.dir {run_dir})' if run_dir else ''}\n")
    handle.flush()
    return handle


def _not_a_lock(path: Path, key: str) -> RecipeError:
    what = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
    return RecipeError(
        key,
        f"{path} is {what}, not the launcher's lock file; remove it (the launcher makes its own, and "
        f"never writes through a link), or choose another {key}",
    )


def _same_file(path: Path, others: tuple[tuple[Path, str], ...]) -> bool:
    """Is `path` one of `others` (a checkpoint.dir that is the run.dir, or a link to it)?"""
    here = path.parent.resolve() / path.name  # the lock itself may be a link: its directory counts
    return any(here == other.parent.resolve() / other.name for other, _ in others)


class _NotWritable(RecipeError):
    """The directory exists (or could), but this process cannot write there."""


def check_writable_dir(path: Path, key: str) -> None:
    """`path` is, or can be made, a directory this process can write in."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        what = "is a file" if existing == path.absolute() else f"is under {existing}, which is a file"
        raise RecipeError(key, f"{path} {what}, not a directory; choose another {key}=...")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".launcher-write-probe.")
    except OSError as e:
        raise _NotWritable(
            key, f"cannot write in {existing} ({e.strerror}); choose another {key}=... or fix its permissions"
        ) from None
    os.close(fd)
    os.unlink(probe)
