"""dist.context_parallel: every sample's sequence split over the ranks of a context-parallel group,
exactly (attention is the only operator that mixes tokens; everything else is per token).

Load balance: a sequence of T tokens is cut into 2 x cp chunks, and rank r holds chunk r and chunk
2cp - 1 - r, a head and a tail, so under causal attention every rank's queries see about as many
keys (the layout of Megatron-LM's and torchtitan's context parallelism).

Attention: each layer all-gathers its group's keys and values (an autograd all-gather whose backward
sums each chunk's gradient over the group with an all-reduce, which gloo has, unlike a
reduce-scatter), then runs SDPA of the rank's queries against the whole sequence's keys under a
boolean mask. Key j is visible to query i (global indices) when j <= i and j >= i - p_i, p_i being
the query's position id: packed samples restart the position ids at 0 at each document
(launcher/datasets/packing.py), so j >= i - p_i keeps a query inside its document; a sequence
without position ids is given its global positions (`batches.split`), which makes the rule plain
causality. torch's own `context_parallel` (ring attention) runs on CUDA only; this runs everywhere.

Memory per rank: the activations of T / cp tokens, plus every layer's gathered keys and values and
a [T / cp, T] attention mask (the SDPA math kernel's scores are as large)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

KEY = "dist.context_parallel"
MIN_TORCH = (2, 6)  # as tensor parallelism: a device mesh with named sub-meshes, flattened for FSDP


def chunk_index(length: int, size: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The global indices of the tokens `rank` holds of a sequence of `length` (a multiple of 2 x
    `size`): its head chunk, then its tail chunk."""
    chunk = length // (2 * size)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([head, tail])


class _Gather(torch.autograd.Function):
    """All-gather along `dim` over the group; backward: the sum over the group of the gradient of
    this rank's part (each rank's queries attend to it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, size: int, rank: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.dim, ctx.group, ctx.size, ctx.rank = dim, group, size, rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, ctx.dim)[ctx.rank].contiguous(), None, None, None, None


@dataclass(frozen=True)
class Context:
    """One rank's place in its context-parallel group: what its attention layers use."""

    size: int
    rank: int
    group: Any  # the group's ProcessGroup

    def local_index(self, local_length: int, device: torch.device) -> torch.Tensor:
        """The global positions of this rank's `local_length` tokens."""
        return chunk_index(local_length * self.size, self.size, self.rank, device)

    def key_index(self, local_length: int, device: torch.device) -> torch.Tensor:
        """The global positions of the gathered keys, in the order `gather` puts them."""
        length = local_length * self.size
        return torch.cat([chunk_index(length, self.size, r, device) for r in range(self.size)])

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _Gather.apply(x, dim, self.group, self.size, self.rank)

    def mask(self, positions: torch.Tensor | None, local_length: int, device: torch.device) -> torch.Tensor:
        """[B or 1, 1, local_length, local_length x size]: True where a query may attend (module doc)."""
        query = self.local_index(local_length, device)
        keys = self.key_index(local_length, device)
        visible = keys[None, :] <= query[:, None]
        if positions is None:
            return visible[None, None]
        start = query[None, :] - positions.to(device)  # [B, T]: where each query's document starts
        return (visible[None] & (keys[None, None, :] >= start[:, :, None]))[:, None]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> torch.Tensor:
        """q [B, H, T/cp, D] against the group's keys and values (gathered here, [B, Hkv, T/cp, D]
        each: grouped-query heads are repeated after the gather, which then moves less)."""
        k, v = self.gather(k, 2), self.gather(v, 2)
        if k.size(1) != q.size(1):
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        if mask is None:
            mask = self.mask(None, q.size(2), q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
