"""The gradients' total 2-norm, for the log and for `train.on_nonfinite: skip`.

Under FSDP every gradient is a DTensor shard. torch's `get_total_norm` works on them, but each of its
per-parameter operations goes through DTensor's dispatch (about 0.2 ms apiece on a CPU, measured with
cProfile on bench/fsdp.py's GPT: 7.8 ms per logged step, 2-3% of its steps' time at a log every 5
steps). Here the norm is taken over the local shards as plain tensors, then each sharding's sum of
squares is all-reduced once: the same value, one collective per mesh instead of a DTensor per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over every parameter's gradient, on the device, without touching the gradients."""
    plain: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}  # (mesh, placements) -> local shards
    for p in params:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "to_local") and hasattr(g, "placements"):  # a DTensor (torch >= 2.6 under FSDP)
            sharded.setdefault((g.device_mesh, tuple(g.placements)), []).append(g.to_local())  # type: ignore[attr-defined]
        else:
            plain.append(g)
    squares = [_sum_of_squares(plain)] if plain else []
    for (mesh, placements), shards in sharded.items():
        squares.append(_summed_over_shards(_sum_of_squares(shards), mesh, placements))
    if not squares:
        return torch.tensor(0.0)
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


def whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm that torch computed over DTensor shards is itself a DTensor: the value over all shards."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    # in fp32 at least, as torch's own norms accumulate: bf16 squares would lose the small gradients
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])
    return norms.square().sum()


def _summed_over_shards(local: torch.Tensor, mesh: Any, placements: tuple) -> torch.Tensor:
    """Sum over the mesh dimensions that shard the gradients; the replicated ones (HSDP's) hold copies.
    One all-reduce per sharding dimension, in mesh order, as DTensor's full_tensor() would do (which
    also warns, under fsdp x tp, that sequential reductions "may give inconsistent results between
    ranks": they do not here, each group reducing the same values in the same order on every rank)."""
    import torch.distributed as dist

    total = local.clone()
    # not is_shard(): FSDP's _StridedShard (over a tensor-parallel shard) is a shard that says False
    for dim, placement in enumerate(placements):
        if not placement.is_replicate():
            dist.all_reduce(total, group=mesh.get_group(dim))
    return total


def clip_norm_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    """torch's clip_grad_norm_ (the same coefficient, max_norm / (norm + 1e-6), at most 1) over
    gradients that live on several meshes, which torch's cannot stack (tensor parallelism: a
    split layer's gradients on the data-parallel x tensor mesh, a replicated one's on the
    data-parallel mesh alone). `norm`: the whole model's, if these are some of its gradients (a
    pipeline stage's). Returns the norm before clipping."""
    norm = grad_norm(params) if norm is None else norm
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            local.mul_(coefficient.to(local.device, local.dtype))
    return norm
