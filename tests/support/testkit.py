"""Components the tests name in recipes (importable by worker processes: tests/support is on PYTHONPATH)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def counting_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce as DDP would, and count the synchronising backward passes per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if bucket.is_last():
        out = Path(os.environ["COUNT_DIR"]) / f"rank{os.environ['RANK']}.txt"
        with open(out, "a") as f:
            f.write("1\n")
    return allreduce_hook(process_group, bucket)


class FailOnRank(nn.Module):
    """A Linear that raises on `rank` at its `at_call`-th forward (training only)."""

    def __init__(self, in_dim: int = 8, out_dim: int = 1, rank: int = 1, at_call: int = 3):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if int(os.environ.get("RANK", 0)) == self.rank and self.calls == self.at_call:
                raise ValueError(f"injected failure on rank {self.rank}")
        return self.lin(x)


class WaitOnRank(nn.Module):
    """A Linear that, on `rank`, blocks at its `at_call`-th forward until a file appears (a stuck rank)."""

    def __init__(self, in_dim: int = 8, out_dim: int = 1, rank: int = 1, at_call: int = 3, until: str = ""):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.rank, self.at_call, self.until, self.calls = rank, at_call, until, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if int(os.environ.get("RANK", 0)) == self.rank and self.calls == self.at_call:
                import time
                while not (self.until and Path(self.until).exists()):
                    time.sleep(0.05)
        return self.lin(x)
