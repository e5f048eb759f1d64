"""State checkpoint directories on disk: written atomically, verified, found, pruned, loaded.
(What goes into one is the checkpointer's business, launcher/checkpoint/checkpointer.py.)

Layout: <dir>/step_00000120/state.pt plus <dir>/step_00000120/COMPLETE, and under FSDP the
model and optimizer shards in <dir>/step_00000120/shards/ (every rank writes its own). A checkpoint is written
into a hidden temporary directory (file fsynced), the COMPLETE marker (size and sha256 of
state.pt) is written last, and only then is the directory renamed into place. A crash at any moment
therefore leaves every earlier checkpoint untouched and loadable, and a half-written one invisible.
The marker also holds the sha256 of every shard file and of DCP's .metadata, checked before
anything is read, and the run directory of the run that wrote it: a save never replaces, and
pruning never deletes, another run's step directory. Loading uses torch.load(weights_only=True),
and a sharded checkpoint's metadata and values are read without unpickling anything but DCP's own
types (launcher/checkpoint/dcp_safe.py): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher.cluster import distributed
from launcher.errors import RecipeError, TrainingError
from launcher.observe.logs import log
from launcher.storage import DIR_MODE, atomic_write, fsync_dir, sha256_of, write_failed

STATE, MARKER = "state.pt", "COMPLETE"
SHARDS = "shards"  # a sharded run's model and optimizer state (DCP: one file per rank, and .metadata)
_STEP_DIR = re.compile(r"step_(\d+)$")


# ---------------------------------------------------------------- checkpoint directories


def shared_temporary(directory: Path, step: int, create: bool) -> Path:
    """The temporary step directory every rank writes its shards into (one name all ranks know);
    the writer (`create`) makes it, empty, before the others are let in."""
    tmp = directory / f".step_{step:08d}.shared.tmp"
    if create:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that was killed (e.g. before a restart)
            shutil.rmtree(tmp)
        tmp.mkdir(mode=DIR_MODE)
    return tmp


def write_checkpoint(
    directory: Path,
    step: int,
    payload: dict[str, Any],
    summary: dict[str, Any] | None = None,
    tmp: Path | None = None,
    owner: str | None = None,
) -> Path:
    """Write <directory>/step_<step> atomically; returns its path. A failed write (disk full)
    removes the partial directory and raises one line naming the path and the free space.
    `summary`: small facts kept in the COMPLETE marker too, readable without loading state.pt.
    `tmp`: a shared_temporary the ranks have written their shards into; the marker lists their
    files' sizes, and counts them in. `owner`: the run writing it (its resolved run.dir), kept in
    the marker; a complete, intact step directory another run wrote is never replaced."""
    final = directory / f"step_{step:08d}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp is None:
            tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".step_{step:08d}.", suffix=".tmp"))
    except OSError as e:  # a directory made read-only, or full, since the run started
        raise checkpoint_write_failed(final, e) from None
    try:
        os.chmod(tmp, DIR_MODE)
        state_path = tmp / STATE
        with open(state_path, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("after-state")
        marker = {
            "step": step,
            "bytes": state_path.stat().st_size,
            "sha256": sha256_of(state_path),
            "shards": _shard_sizes(tmp),
            "time": time.time(),
            **({"run_dir": owner} if owner is not None else {}),
            **(summary or {}),
        }
        atomic_write(tmp / MARKER, lambda f: f.write(json.dumps(marker).encode()))
        if final.exists():  # an earlier attempt at this very step (e.g. before a restart): replace it
            other = written_by_another(final, owner)
            if other is not None and verify(final) is None:  # a damaged one (a copy, say) is worth nothing
                raise RecipeError(
                    "checkpoint.dir",
                    f"{final} was written by another run ({other}); not replacing it: point checkpoint.dir "
                    "at a directory of its own",
                )
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        # the reason first: the free space is measured before the partial checkpoint is removed
        failed = checkpoint_write_failed(final, e) if isinstance(e, (OSError, RuntimeError, TrainingError)) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failed is not None:  # torch.save reports a full disk as a RuntimeError
            raise failed from None
        raise
    fsync_dir(directory)
    return final


def checkpoint_write_failed(final: Path, exc: BaseException) -> TrainingError:
    """A checkpoint that could not be written, as one line: why, and which checkpoint is left to resume."""
    if isinstance(exc, TrainingError):  # already a sentence (an atomic write inside the checkpoint)
        return TrainingError(f"{exc}{_what_is_left(final)}")
    return write_failed(final, exc, _what_is_left(final))


def _what_is_left(final: Path) -> str:
    previous = next((p for p in list_checkpoints(final.parent) if p != final and (p / MARKER).is_file()), None)
    if previous is None:
        return f"; no checkpoint was saved in {final.parent} before it"
    return f"; the previous checkpoint ({previous.name}) is intact"


def crash_point(name: str) -> None:
    """Tests kill the process at a chosen point of a checkpoint write (deterministically, not by a
    race): LAUNCHER_TEST_CRASH_AT=after-state dies between state.pt and the COMPLETE marker."""
    if os.environ.get("LAUNCHER_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def hold_point() -> None:
    """Tests hold a background checkpoint write before it starts writing (LAUNCHER_TEST_HOLD_WRITE
    names a file; the write goes on once it exists), to see training go on meanwhile."""
    release = os.environ.get("LAUNCHER_TEST_HOLD_WRITE")
    while release and not os.path.exists(release):
        time.sleep(0.05)


def _shard_sizes(step_dir: Path) -> dict[str, int]:
    """The shard files under <step_dir>/shards/ (DCP's), by relative path: their sizes."""
    shards = step_dir / SHARDS
    if not shards.is_dir():
        return {}
    return {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(shards.rglob("*")) if p.is_file()}


def written_by_another(path: Path, owner: str | None) -> str | None:
    """The run.dir of the run that wrote checkpoint `path`, if its marker names one other than
    `owner` (None: this run's, one whose marker names no run, or `owner` unknown)."""
    if owner is None:
        return None
    try:
        written_by = json.loads((path / MARKER).read_text()).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return written_by if isinstance(written_by, str) and written_by != owner else None


def read_marker(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of a verified checkpoint directory: its step, time and summary."""
    return json.loads((path / MARKER).read_text())


def verify(path: Path, share: tuple[int, int] = (0, 1), hashes: bool = True) -> str | None:
    """None if the checkpoint directory is complete and intact, else what is wrong with it. The
    marker and every size are checked; the files are hashed only where `share` (index, count) says:
    every count-th of them, from index (the ranks of a job split the reading, `verify_together`),
    and not at all without `hashes` (`launcher check`: quick, the run hashes them)."""
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
    for name, size in (marker.get("shards") or {}).items():
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size != size:
            return f"shard {name} has {shard.stat().st_size} bytes, the marker says {size}"
    # state.pt, every shard file and DCP's .metadata, hashed by the ranks that wrote them (damage
    # that keeps a file's size is found before anything is unpickled or loaded)
    if not hashes:
        return None
    digests = [(STATE, marker.get("sha256")), *sorted((marker.get("shard_sha256") or {}).items())]
    index, count = share
    for name, digest in digests[index::count]:
        if sha256_of(path / name) != digest:
            what = f"{STATE} is" if name == STATE else f"shard {name} is"
            return f"{what} corrupt (sha256 differs from the marker's)"
    return None


def verify_together() -> Callable[[Path], str | None]:
    """`verify` for the ranks of a job (every rank calls it, in the same order): each hashes its
    share of the files, so a checkpoint is read once in all, not once per rank, and all agree on
    the verdict (the first problem any rank found). Plain `verify` without a process group."""
    if not distributed.is_initialized():
        return verify
    share = (torch.distributed.get_rank(), torch.distributed.get_world_size())

    def check(path: Path) -> str | None:
        return distributed.first_of(verify(path, share))

    return check


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest step first (complete or not)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def find_latest(directory: Path, warn: bool = True, check: Callable[[Path], str | None] = verify) -> Path | None:
    """The newest complete, intact checkpoint (by `check`); damaged ones are skipped (with a warning if `warn`)."""
    for path in list_checkpoints(directory):
        problem = check(path)
        if problem is None:
            return path
        if warn:
            log.warning(f"skipping checkpoint {path}: {problem}")
    return None


def resolve_resume(
    resume: str, directory: Path, warn: bool = True, check: Callable[[Path], str | None] = verify
) -> Path | None:
    """`checkpoint.resume` -> the checkpoint directory to load, or None to start fresh. `warn`:
    report skipped damaged checkpoints (one process of the job says it, not every rank)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(directory, warn, check)
    path = Path(resume).expanduser()
    if path.is_file() and path.name == STATE:
        path = path.parent
    if path.is_dir() and not (path / MARKER).exists() and not list_checkpoints(path):
        path = checkpoints_of_run(path) or path  # a run directory: its checkpoints
    if path.is_dir() and not (path / MARKER).exists() and list_checkpoints(path):
        latest = find_latest(path, warn, check)  # a directory of checkpoints: its newest
        if latest is None:
            raise RecipeError("checkpoint.resume", f"{path} holds no complete, intact checkpoint")
        return latest
    if not path.exists():
        existing = [p.name for p in list_checkpoints(path.parent if path.parent.is_dir() else directory)]
        where = path.parent if path.parent.is_dir() and existing else directory
        have = f"; {where} holds {', '.join(existing[:5])}" if existing else ""
        raise RecipeError(
            "checkpoint.resume",
            f"{path} does not exist (checkpoint.keep_last may have deleted it){have}; use one of those, auto, or none",
        )
    is_checkpoint = path.is_dir() and ((path / STATE).exists() or (path / MARKER).exists())
    problem = (
        check(path)
        if is_checkpoint
        else f"not a checkpoint (expected a step_N/ directory with {STATE} and {MARKER}, a directory of them, "
        "or a run directory)"
    )
    if problem:
        raise RecipeError("checkpoint.resume", f"{path}: {problem}")
    return path


def checkpoints_of_run(run_dir: Path) -> Path | None:
    """The checkpoint directory of a run directory (one holding its config.yaml): the config's
    checkpoint.dir, else <run_dir>/checkpoints; None if it holds no checkpoints or is no run's."""
    import yaml

    candidates = []
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        named = (config.get("checkpoint") or {}).get("dir")
        if isinstance(named, str) and named:
            candidates.append(Path(named).expanduser())
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    candidates.append(run_dir / "checkpoints")
    return next((c for c in candidates if list_checkpoints(c)), None)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def prune(directory: Path, keep_last: int, owner: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints of this run (`owner`; another run's are
    left alone). (A failed write removes its own temporary directory; one left by a killed process
    goes at the next start, RunDir.remove_stale_temporaries.)"""
    complete = [
        p for p in list_checkpoints(directory) if (p / MARKER).exists() and written_by_another(p, owner) is None
    ]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
