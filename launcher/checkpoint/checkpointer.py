"""Saving and restoring a run's state as a dict of named objects.

Everything that is saved (model, optimizer, scheduler, scaler, train state, log window, RNG
streams, logger ids) has `state_dict()` / `load_state_dict()`, the shape of torch's modules and
optimizers and of `torch.distributed.checkpoint`'s `Stateful`. The checkpointer knows nothing of
what the objects are: it asks each for its state on every rank (gathering RNG streams or shards is a
collective), has the writing rank store the result as one step directory (launcher/checkpoint/step_dirs.py:
atomic, verified), and gives each object back its part on restore. What to save, when, and which
recipe may continue a checkpoint is the run's policy (launcher/train/resume.py).

Format 2 (this one): {"format": 2, <metadata>, <name>: <that object's state_dict> or None,
"sharded": [<names kept in the step directory's shards/ instead>]} (no "sharded": none are).
Format 1 (launcher 0.x before the checkpointer) is read and upgraded; a newer format is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from launcher.checkpoint import background, sharded_state, step_dirs
from launcher.checkpoint.background import BackgroundWrite
from launcher.cluster import distributed
from launcher.errors import RecipeError
from launcher.observe.logs import log
from launcher.storage import sha256_of

FORMAT = 2


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Checkpointer:
    directory: Path
    keep_last: int
    is_writer: bool  # the one process that writes a (replicated) checkpoint: rank 0
    group: Any = None  # the process group every rank waits on until the checkpoint is on disk
    # objects every rank writes its own shards of, through DCP (launcher/checkpoint/sharded_state.py)
    sharded: frozenset[str] = frozenset()

    # checkpoint.async_save: a save that may (`blocking=False`) is staged in host memory and
    # written by a thread (launcher/checkpoint/background.py); None: every save is synchronous
    background: BackgroundWrite | None = None
    # the run writing (its resolved run.dir), named in each marker: another run's checkpoints are never replaced
    owner: str | None = None

    def save(
        self,
        step: int,
        objects: Mapping[str, Stateful | None],
        metadata: Mapping[str, Any],
        summary: Mapping[str, Any] | None = None,
        blocking: bool = True,
    ) -> Path | None:
        """Every rank calls this at the same step, with the same names. Returns the step directory
        on the writer once it is on disk, None elsewhere, and None where it is written in the
        background (`blocking=False` with checkpoint.async_save). `summary`: small facts also
        kept in the COMPLETE marker."""
        overlap = set(objects) & set(metadata)
        if overlap:
            raise ValueError(f"checkpoint names used twice: {sorted(overlap)}")
        self.wait()  # one write at a time, in order; a failed background write is raised here
        # asked for on every rank, in the training thread: some gather (RNG streams) over the groups training uses
        states = {
            name: None if obj is None else obj.state_dict() for name, obj in objects.items() if name not in self.sharded
        }
        shards = {name: obj.state_dict() for name in sorted(self.sharded) if (obj := objects[name]) is not None}
        if blocking or self.background is None:
            return self._write(step, states, shards, metadata, summary, self.group, None)
        writes = self.background
        staged, staged_shards = background.stage(states) if self.is_writer else {}, background.stage(shards)

        def write() -> None:
            step_dirs.hold_point()
            path = self._write(step, staged, staged_shards, metadata, summary, writes.group, writes.group)
            if path is not None:
                log.info(f"checkpoint: {path} (written in the background)")

        writes.start(write)
        return None

    def wait(self) -> None:
        """Until the checkpoint being written in the background (if any) is on disk."""
        if self.background is not None:
            self.background.wait()

    def settle(self, timeout_s: float) -> None:
        """After a failure: give a background write up to `timeout_s` to finish, quietly."""
        if self.background is not None:
            self.background.settle(timeout_s)

    def _write(
        self,
        step: int,
        states: Mapping[str, Any],
        shards: Mapping[str, Any],
        metadata: Mapping[str, Any],
        summary: Mapping[str, Any] | None,
        group: Any,
        dcp_group: Any,
    ) -> Path | None:
        """Write states the ranks have asked for (and, in the background, copied): the shards by
        every rank, then state.pt and COMPLETE by the writer. `group`: what the ranks wait on;
        `dcp_group`: DCP's (None: the default group)."""
        tmp, digests = None, None
        if self.sharded:
            tmp = step_dirs.shared_temporary(self.directory, step, create=self.is_writer)
            distributed.barrier(group)  # the directory exists, empty, before any rank writes
            digests = self._save_shards(tmp, step, shards, group, dcp_group)
        path = None
        if self.is_writer:
            payload = {"format": FORMAT, **metadata, **states, "sharded": sorted(self.sharded)}
            marker = {**(summary or {}), "shard_sha256": digests} if digests is not None else dict(summary or {})
            path = step_dirs.write_checkpoint(self.directory, step, payload, summary=marker, tmp=tmp, owner=self.owner)
            step_dirs.prune(self.directory, self.keep_last, self.owner)
        # nobody leaves (and, under torchrun, gets its peers killed) before the checkpoint is on disk
        distributed.barrier(group)
        return path

    def _save_shards(
        self, tmp: Path, step: int, states: Mapping[str, Any], group: Any, dcp_group: Any
    ) -> dict[str, str] | None:
        """Every rank writes its shards; the writer gets every file's sha256 (None elsewhere). A failed
        write (a full disk, on any rank: DCP tells every rank) removes the partial directory and is
        one line naming it and the free space."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's failures

        shards = tmp / step_dirs.SHARDS
        try:
            mine = sharded_state.save(shards, states, dcp_group)
        except (Exception, CheckpointException) as e:
            # the reason first: a full disk has room again once the partial checkpoint is removed
            failed = step_dirs.checkpoint_write_failed(self.directory / f"step_{step:08d}", e)
            distributed.barrier(group)  # every rank is out of the save before the writer removes it
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failed from None
        gathered = distributed.gather_objects(mine, group)  # also: every rank's shards are on disk
        if gathered is None:
            return None
        digests = {f"{step_dirs.SHARDS}/{name}": digest for part in gathered for name, digest in part.items()}
        metadata = shards / ".metadata"  # the coordinator's, written once every rank's files are
        digests[f"{step_dirs.SHARDS}/{metadata.name}"] = sha256_of(metadata)
        return digests


def read(path: Path) -> dict[str, Any]:
    """A verified checkpoint directory's payload, in the current format."""
    return upgrade(step_dirs.load(path), path)


def restore(payload: Mapping[str, Any], objects: Mapping[str, Stateful | None]) -> None:
    """Give each object its saved state. An object absent on either side (a run without a
    scheduler, say) is skipped: the caller decides whether that is worth a warning."""
    for name, obj in objects.items():
        if obj is not None and payload.get(name) is not None:
            obj.load_state_dict(payload[name])


def in_shards(payload: Mapping[str, Any], name: str) -> bool:
    """Does the checkpoint keep object `name` in its DCP shards (not in state.pt)? The format's own
    question: nothing outside this package reads the key that answers it."""
    return name in payload.get("sharded", [])


def has_shards(payload: Mapping[str, Any]) -> bool:
    """Does the checkpoint keep any object in DCP shards (a sharded run's)?"""
    return bool(payload.get("sharded"))


def whole_state(payload: Mapping[str, Any], name: str) -> Any:
    """Object `name`'s state as state.pt holds it, whole; None where the shards hold it instead."""
    return None if in_shards(payload, name) else payload.get(name)


def restore_sharded(path: Path, payload: Mapping[str, Any], objects: Mapping[str, Stateful]) -> None:
    """Every rank: load the objects a sharded checkpoint keeps in its shards (at any world size)."""
    names = [name for name in objects if in_shards(payload, name)]
    if names:
        sharded_state.load(path / step_dirs.SHARDS, {name: objects[name] for name in names})


def upgrade(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 1 -> 2: the RNG streams were a bare list of ranks; no log window or logger ids yet."""
    version = payload.get("format") if isinstance(payload, dict) else None
    if version == FORMAT:
        return payload
    if version == 1:
        upgraded = dict(payload, format=FORMAT)
        upgraded["rng"] = {"ranks": payload["rng"]}
        upgraded.setdefault("loggers", {})
        upgraded.setdefault("log_window", None)
        return upgraded
    if isinstance(version, int) and version > FORMAT:
        raise RecipeError(
            "checkpoint.resume",
            f"{path} is in checkpoint format {version}, newer than this launcher "
            f"reads (1 to {FORMAT}); resume it with the launcher that wrote it, or "
            "start over with checkpoint.resume=none run.overwrite=true",
        )
    raise RecipeError(
        "checkpoint.resume",
        f"{path} holds no launcher checkpoint (no format number); "
        "point checkpoint.resume at a step_N directory the launcher wrote",
    )
