"""The collective trail: the last collectives this rank entered, kept in a small file that is always
current, for the hang report (cluster/hang.py).

`torch.distributed`'s Python collectives (all_reduce, broadcast, all_gather*, reduce_scatter*,
barrier, the *_object ones, send/recv ...) are wrapped once per process, so FSDP2's and DCP's calls
are recorded too; DDP's gradient all-reduce is called from C++ and is not. Each entry is the
operation, its group, the tensors' shapes, a sequence number per group (the same on every rank of
the group, as long as they all make the same calls), the line of code that called it (the first
frame outside torch and the launcher's thin collective helpers) and its state: `in` until it
returns, then `done` (or `issued` for an async_op, `timed out`, `failed`).

The file is memory-mapped: one slot per entry in a ring, written with a memory copy and no system
call, so that it is on disk (in the page cache) when the process is stopped, killed or stuck in C
code holding the interpreter, and a reader needs nothing from the process itself.
"""

from __future__ import annotations

import functools
import inspect
import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SLOTS = 32
SLOT_BYTES = 512  # the longest entry (every field at its limit) is about 460 bytes
_STATE_AT, _STATE_WIDTH = len('{"state": "'), 9  # each slot begins with its fixed-width state

# the Python collectives recorded (those this torch has)
COLLECTIVES = (
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",  # FSDP2's, from torch 2.12 or so
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_into_tensor",
    "gather_object",
    "gather_single",
    # not isend and irecv: torch's P2POp refuses any function but c10d's own two (pipelining builds
    # P2POp(dist.irecv, ...)); their batch_isend_irecv and wait are recorded
    "recv",
    "recv_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "send_object_list",
)
# frames that are not "the line that called it": torch itself, and the launcher's one-line helpers
_HELPERS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.abspath(__file__),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed.py"),
)


@dataclass(frozen=True)
class Entry:
    n: int  # this rank's count of recorded collectives
    t: float  # when it was entered (time.time())
    op: str
    group: str  # "world", a device mesh dimension ("mesh_dp_shard"), or the group's ranks
    seq: int  # the how-manieth collective on `group` this is, from 1
    shapes: str
    at: str  # file:line of the call
    fn: str  # the function that called it
    state: str

    def describe(self) -> str:
        shapes = f" {self.shapes}" if self.shapes else ""
        return f"{self.op} #{self.seq} on {self.group}{shapes}"


class Trail:
    """The ring of entries in `path`, written by this process."""

    def __init__(self, path: Path, rank: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self._count = path, 0
        self._groups: dict[int, tuple[str, list[int]]] = {}
        with open(path, "w+b") as f:
            f.truncate((SLOTS + 1) * SLOT_BYTES)
            self._map = mmap.mmap(f.fileno(), (SLOTS + 1) * SLOT_BYTES)
        self._map[:SLOT_BYTES] = _slot({"pid": os.getpid(), "rank": rank, "slots": SLOTS})
        self._map[SLOT_BYTES:] = (b" " * (SLOT_BYTES - 1) + b"\n") * SLOTS

    def enter(self, op: str, group: Any, tensors: Any) -> int:
        """Record a collective being entered; returns its slot's offset, for `leave`. (Formatted by
        hand, from parts quoted once: this runs before every collective.)"""
        name, counter = self._group(group)
        counter[0] += 1
        self._count += 1
        at, fn = _caller()
        line = (
            f'{{"state": "{"in":<{_STATE_WIDTH}}", "n": {self._count}, "t": {time.time():.3f}, "op": "{op}", '
            f'"group": {name}, "seq": {counter[0]}, "shapes": "{_shapes(tensors)[:60]}", "at": {at}, "fn": "{fn}"}}'
        ).encode()
        offset = SLOT_BYTES * (1 + self._count % SLOTS)
        self._map[offset : offset + SLOT_BYTES] = line[: SLOT_BYTES - 1].ljust(SLOT_BYTES - 1) + b"\n"
        return offset

    def leave(self, offset: int, state: str) -> None:
        self._map[offset + _STATE_AT : offset + _STATE_AT + _STATE_WIDTH] = state.ljust(_STATE_WIDTH).encode()

    def close(self) -> None:
        self._map.close()

    def _group(self, group: Any) -> tuple[str, list[int]]:
        """The group's name (quoted) and its count of collectives."""
        key = id(group)
        if key not in self._groups:
            self._groups[key] = (json.dumps(_group_name(group)[:60]), [0])
        return self._groups[key]


def _slot(data: dict[str, Any]) -> bytes:
    """One slot: `data` as a line of JSON, padded."""
    line = json.dumps(data).encode()
    return line[: SLOT_BYTES - 1].ljust(SLOT_BYTES - 1) + b"\n"


def _group_name(group: Any) -> str:
    if group is None or group is dist.GroupMember.WORLD:
        return "world"
    desc = getattr(group, "group_desc", "")
    if desc.startswith("mesh_"):  # a device mesh's dimension: torch names its group after it
        return desc
    name = f"group {getattr(group, 'group_name', '?')}"
    try:
        return f"{name} (ranks {','.join(map(str, dist.get_process_group_ranks(group)))})"
    except (RuntimeError, ValueError):
        return name


_quoted: dict[tuple[str, int], str] = {}


def _caller() -> tuple[str, str]:
    """ "file:line" (quoted) and function of the first frame outside torch and the launcher's helpers."""
    frame: Any = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_HELPERS):
        frame = frame.f_back
    if frame is None:
        return '"?"', "?"
    key = (frame.f_code.co_filename, frame.f_lineno)
    if key not in _quoted:
        _quoted[key] = json.dumps(f"{key[0]}:{key[1]}"[-120:])
    return _quoted[key], frame.f_code.co_name.replace('"', "")[:60]


def _shapes(tensors: Any) -> str:
    if isinstance(tensors, torch.Tensor):
        dtype = _DTYPES.get(tensors.dtype) or _DTYPES.setdefault(
            tensors.dtype, str(tensors.dtype).removeprefix("torch.")
        )
        return f"{dtype}{list(tensors.shape)}"
    if isinstance(tensors, (list, tuple)) and tensors and isinstance(tensors[0], torch.Tensor):
        return f"{len(tensors)} x {_shapes(tensors[0])}"
    return ""


_DTYPES: dict[torch.dtype, str] = {}  # "float32", named once

# ---------------------------------------------------------------- wrapping torch.distributed

_active: Trail | None = None
_originals: dict[str, Callable[..., Any]] = {}


def install(trail: Trail) -> None:
    """Record every Python collective of this process in `trail` (until `uninstall`)."""
    global _active
    _active = trail
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and name not in _originals:
            _originals[name] = fn
            setattr(dist, name, _recorded(name, fn))


def uninstall() -> None:
    global _active
    for name, fn in _originals.items():
        setattr(dist, name, fn)
    _originals.clear()
    if _active is not None:
        _active.close()
    _active = None


def _recorded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    params = list(inspect.signature(fn).parameters)
    at_group = params.index("group") if "group" in params else None
    at_async = params.index("async_op") if "async_op" in params else None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        trail = _active
        if trail is None:
            return fn(*args, **kwargs)
        group = kwargs.get("group", args[at_group] if at_group is not None and len(args) > at_group else None)
        offset = trail.enter(name, group, args[0] if args else next(iter(kwargs.values()), None))
        try:
            out = fn(*args, **kwargs)
        except BaseException as e:
            trail.leave(offset, "timed out" if "Timed out" in str(e) else "failed")
            raise
        async_op = kwargs.get("async_op", args[at_async] if at_async is not None and len(args) > at_async else False)
        trail.leave(offset, "issued" if async_op else "done")
        return out

    return call


# ---------------------------------------------------------------- reading

IN_COLLECTIVE = ("in", "timed out")


@dataclass(frozen=True)
class Recorded:
    pid: int | None
    entries: list[Entry]  # oldest first

    @property
    def current(self) -> Entry | None:
        """The collective the rank is in (or timed out in), if it is in one."""
        return self.entries[-1] if self.entries and self.entries[-1].state in IN_COLLECTIVE else None


def read(path: Path) -> Recorded:
    """The trail a process left in `path` (no entries if there is none)."""
    try:
        lines = path.read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return Recorded(None, [])
    pid, entries = None, []
    for i, line in enumerate(lines):
        try:
            data = json.loads(line)
        except ValueError:  # an empty slot, or one being written
            continue
        if i == 0:
            pid = data.get("pid")
            continue
        try:
            entries.append(Entry(**{**data, "state": str(data["state"]).strip()}))
        except TypeError:
            continue
    return Recorded(pid, sorted(entries, key=lambda e: e.n))
