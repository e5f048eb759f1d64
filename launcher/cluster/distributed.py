"""The process group's whole life: `session()` creates it and destroys it exactly once.

Backend `auto` is nccl when this local rank has a GPU, else gloo on CPU. A job started by a
launcher (torchrun, SLURM) gets a process group even at world size 1, so that the nccl/gloo path
is the same one at every size; a plain single process gets none: nothing to set up, no port needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from launcher.cluster.env import ClusterEnv
from launcher.errors import LaunchError, TrainingError
from launcher.observe.logs import log

T = TypeVar("T")
TIMEOUT_FOREVER_S = 7 * 24 * 3600.0  # "no limit" for gloo, which takes one on every wait (in int32 ms)


@dataclass(frozen=True)
class Session:
    env: ClusterEnv
    backend: str  # nccl | gloo | none (a plain single process)
    device: torch.device
    # a CPU (gloo) group for the launcher's own coordination: preemption agreement, gathering RNG
    # states, naming hung ranks. None without a process group.
    control: Any = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def gpus_for(local_world_size: int) -> bool:
    """Does every local rank have a GPU of its own? (Queries the driver; creates no CUDA context.)
    The answer is the same on every rank of a node, so all ranks pick the same backend."""
    return torch.cuda.is_available() and local_world_size <= torch.cuda.device_count()


def pick_backend(
    requested: str, local_rank: int, local_world_size: int = 1, gpu_bound: bool = False
) -> tuple[str, torch.device]:
    """`gpu_bound`: the scheduler gave this process one GPU of its own, which it sees as cuda:0."""
    has_gpu = torch.cuda.is_available() if gpu_bound else gpus_for(local_world_size)
    if requested == "nccl" and not has_gpu:
        why = (
            "no CUDA device is visible"
            if not torch.cuda.is_available()
            else (f"{local_world_size} local ranks share {torch.cuda.device_count()} GPU(s)")
        )
        raise LaunchError("dist.backend", f"nccl needs one GPU per local rank but {why}; use dist.backend=auto or gloo")
    if requested == "auto" and torch.cuda.is_available() and not has_gpu and local_rank == 0:
        log.warning(f"{local_world_size} local ranks but {torch.cuda.device_count()} GPU(s): training on CPU with gloo")
    backend = "nccl" if requested == "auto" and has_gpu else ("gloo" if requested == "auto" else requested)
    device = torch.device("cuda", 0 if gpu_bound else local_rank) if has_gpu else torch.device("cpu")
    return backend, device


@contextlib.contextmanager
def session(env: ClusterEnv, backend: str = "auto", timeout_s: float = 600.0) -> Iterator[Session]:
    """Init the process group (if world size > 1), bind the device, and always destroy it."""
    backend, device = pick_backend(backend, env.local_rank, env.local_world_size, env.gpu_bound)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.source == "single":
        yield Session(env, "none", device)
        return
    # env:// so that torchrun workers reuse the elastic agent's store; other sources export these.
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    try:
        control = dist.new_group(backend="gloo")  # separate: usable even after the main group timed out
        yield Session(env, backend, device, control)
        leave_together(control, env.rank, timeout_s)  # only after a body that ended without an error
    finally:
        close(env.rank)


# how long destroying the process group may take before this process exits without it
CLOSE_LIMIT_S = 60.0
_unclosed = threading.Event()  # set when it could not: the process must exit without waiting for it


def leave_together(control: Any, rank: int, timeout_s: float) -> None:
    """At the end of a run, every rank waits here for the others before the process group closes.

    Rank 0 waits up to `timeout_s` (dist.timeout_s) and names the ranks that did not come: a rank
    stuck after its work (in a user's hook, a finalizer, a dead file system) would otherwise keep the
    job, and the allocation, waiting forever after rank 0 has ended. Its one line ends the run with
    a failure, so that the launcher stops the stuck rank. The other ranks wait for rank 0 for as long
    as it lives: it may legitimately take long (it alone writes the final weights and exports)."""
    patience = timeout_s if rank == 0 else TIMEOUT_FOREVER_S
    try:
        dist.monitored_barrier(group=control, timeout=timedelta(seconds=patience), wait_all_ranks=True)
    except RuntimeError as e:
        if rank != 0:  # rank 0 has gone (it ended on an error of its own, which it reports)
            return
        raise TrainingError(
            f"{_failed_to_pass(e)} did not reach the end of the run within dist.timeout_s={timeout_s:g}s after "
            "rank 0 (stuck or much slower: see its stack or log); the checkpoints and weights were written"
        ) from None


def close(rank: int) -> None:
    """Destroy the process group, but never wait for it for longer than CLOSE_LIMIT_S: a teardown that
    cannot finish must not hang the job. Past the limit, one line says so and the process exits
    (`must_exit_now`) without the group."""
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="launcher-close", daemon=True).start()
    if not done.wait(CLOSE_LIMIT_S):
        _unclosed.set()
        log.error(
            f"[rank {rank}] the process group did not close within {CLOSE_LIMIT_S:g} s (a peer may be stuck); "
            "exiting without it"
        )


def must_exit_now() -> bool:
    """Did the process group fail to close (`close`)? Then the process must leave at once (os._exit):
    an ordinary exit would wait for it again, in its destructors."""
    return _unclosed.is_set()


def own_group() -> Any:
    """A CPU (gloo) group of its own, for collectives another thread runs beside training's (every
    rank calls this at the same point); None without a process group."""
    return dist.new_group(backend="gloo") if is_initialized() else None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType | None = None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op without a process group."""
    if is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@contextlib.contextmanager
def local_main_first(name: str) -> Iterator[None]:
    """Local rank 0 of each node runs the body first (filling a cache on that node's disk, for as
    long as that takes); the node's other ranks wait for it, then run it (reading the cache).
    `name` tells this body from others (a cache key).

    They wait on the rendezvous store, polled, not in a collective: a collective would time out
    after dist.timeout_s however long the work takes, and a peer that dies meanwhile would be
    reported by local rank 0 as a failure of its own work. A peer's death is noticed at the next
    collective instead, and reported as such."""
    if not is_initialized():
        yield
        return
    env = ClusterEnv.detect()  # torchrun's or SLURM's variables: which node, which rank on it
    key = f"launcher/local_main_first/{env.node_rank}/{name}"
    store = dist.distributed_c10d._get_default_store()
    if env.local_rank != 0:
        _wait_for(store, key)  # still working: wait on (torchrun ends this process if local rank 0 dies)
        yield
        return
    try:
        yield
    finally:
        store.set(key, "done")  # also when the body failed: the others then fail alike, each in one line


def once_per_node(name: str, compute: Callable[[], T]) -> T:
    """`compute()` on local rank 0 of each node; the node's other ranks take its result (JSON) from
    the rendezvous store instead of computing it again: a scan of a file every rank would otherwise
    read whole, say. Should local rank 0 fail, the others compute it themselves and fail alike, each
    in its own line. Polled, not a collective, for the reason local_main_first gives."""
    if not is_initialized():
        return compute()
    env = ClusterEnv.detect()
    key = f"launcher/once_per_node/{env.node_rank}/{name}"
    store = dist.distributed_c10d._get_default_store()
    if env.local_rank == 0:
        try:
            value = compute()
        except BaseException:
            store.set(key, "")
            raise
        store.set(key, json.dumps(value))
        # the store lives in this process on the first node: stay until the node's ranks have read
        # it, so that a refusal of the value (a file's id beyond the vocabulary) reaches each of them
        while store.add(f"{key}/read", 0) < env.local_world_size - 1:
            time.sleep(0.05)
        return value
    try:
        if not _wait_for(store, key):
            return compute()
        text = store.get(key).decode()
        store.add(f"{key}/read", 1)
    except RuntimeError:  # the store went away between the poll and the read: as in _wait_for
        return compute()
    return json.loads(text) if text else compute()


def _wait_for(store: Any, key: str) -> bool:
    """Poll until `key` is set: True; False if the store went away meanwhile (it lives in rank 0's
    process, which may have ended on an error of its own after setting the key: this rank then does
    the work itself and meets the same error, in its own one line, rather than a store traceback)."""
    try:
        while not store.check([key]):
            time.sleep(0.2)
        return True
    except RuntimeError:  # torch's DistNetworkError (a RuntimeError): the store's process has gone
        return False


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (so that all ranks stop or continue together)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_initialized():
        dist.barrier(group=group)


def gather_objects(obj: object, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's `obj`, on rank 0 (None elsewhere); [obj] without a process group."""
    if not is_initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def first_of(value: str | None) -> str | None:
    """The lowest rank's non-None `value`, on every rank (`value` itself without a process group):
    a verdict that any rank may reach, agreed by all."""
    if not is_initialized():
        return value
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "Timed out" in str(exc)


def missing_ranks(group: dist.ProcessGroup | None, rank: int, timeout_s: float) -> str:
    """After a collective timed out: which ranks do not answer? (monitored_barrier on a gloo group
    made before the failure: creating one now would itself wait for the missing ranks)"""
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        if re.search(_FAILED_TO_PASS, str(e)):
            return f"{_failed_to_pass(e)} did not arrive"
        if rank != 0:
            return "rank 0 did not answer (it may be the one that is stuck; see its log)"
        return str(e).splitlines()[0]
    return "every rank answered the check; the stuck collective may have been a mismatched one"


_FAILED_TO_PASS = r"Ranks? ([\d, ]+) failed to pass"


def _failed_to_pass(e: RuntimeError) -> str:
    """'rank(s) 1, 3' from monitored_barrier's error on rank 0, or the error's first line."""
    found = re.search(_FAILED_TO_PASS, str(e))
    return f"rank(s) {found.group(1).strip()}" if found else str(e).splitlines()[0]


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """Did this collective fail because another rank died (not because of anything on this rank)?"""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE)
