"""The process group's whole life: `session()` creates it and destroys it exactly once.

Backend `auto` is nccl when this local rank has a GPU, else gloo on CPU. At world size 1 no
process group is created at all: nothing to synchronise, nothing to tear down, no port needed.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from launcher.env import ClusterEnv
from launcher.errors import LaunchError


@dataclass(frozen=True)
class Session:
    env: ClusterEnv
    backend: str  # nccl | gloo | none (world size 1)
    device: torch.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size


def cuda_for(local_rank: int) -> bool:
    """Does this local rank have a GPU of its own? (Queries the driver; creates no CUDA context.)"""
    return torch.cuda.is_available() and local_rank < torch.cuda.device_count()


def pick_backend(requested: str, local_rank: int) -> tuple[str, torch.device]:
    has_gpu = cuda_for(local_rank)
    if requested == "nccl" and not has_gpu:
        why = "no CUDA device is visible" if not torch.cuda.is_available() else (
            f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible)")
        raise LaunchError("dist.backend", f"nccl needs one GPU per local rank but {why}; use dist.backend=auto or gloo")
    backend = "nccl" if requested == "auto" and has_gpu else ("gloo" if requested == "auto" else requested)
    device = torch.device("cuda", local_rank) if has_gpu else torch.device("cpu")
    return backend, device


@contextlib.contextmanager
def session(env: ClusterEnv, backend: str = "auto", timeout_s: float = 600.0) -> Iterator[Session]:
    """Init the process group (if world size > 1), bind the device, and always destroy it."""
    backend, device = pick_backend(backend, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.is_distributed:
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
        yield Session(env, backend, device)
    finally:
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op without a process group."""
    if is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (so that all ranks stop or continue together)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if is_initialized():
        dist.barrier()


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """Did this collective fail because another rank died (not because of anything on this rank)?"""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE)
