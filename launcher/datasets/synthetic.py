"""Generated datasets: deterministic from a seed, any size, no files. For tests and benchmarks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class _Tensors(Dataset):
    deterministic = True  # no randomness in __getitem__: no per-sample seeding needed
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Regression(_Tensors):
    """y = x @ W + noise, with W, x and the noise drawn from `seed`."""

    def __init__(self, size: int = 256, in_dim: int = 8, out_dim: int = 1, noise: float = 0.1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(in_dim, out_dim, generator=g)
        self.x = torch.randn(size, in_dim, generator=g)
        self.y = self.x @ w + noise * torch.randn(size, out_dim, generator=g)


class Classification(_Tensors):
    """Gaussian blobs, one per class."""

    def __init__(self, size: int = 256, in_dim: int = 8, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centers = 2 * torch.randn(classes, in_dim, generator=g)
        self.y = torch.randint(0, classes, (size,), generator=g)
        self.x = centers[self.y] + torch.randn(size, in_dim, generator=g)


class Images(Dataset):
    """Random images of `shape` with random labels. A pool of at most `pool` distinct images is made
    once and indexed cyclically, so a sample costs an index, as for data already in memory."""

    deterministic = True

    def __init__(
        self, size: int = 1024, shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, seed: int = 0, pool: int = 2048
    ):
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.x = torch.randn(min(size, pool), *shape, generator=g)
        self.y = torch.randint(0, classes, (min(size, pool),), generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i % len(self.x)], self.y[i % len(self.y)]


class Tokens(Dataset):
    """Random token sequences: (input, next-token target) pairs of length `seq_len`; with `mapping`,
    {"input_ids", "labels"} rows as a transformers causal LM takes them (it shifts the labels itself)."""

    deterministic = True

    def __init__(
        self, size: int = 1024, seq_len: int = 128, vocab_size: int = 256, seed: int = 0, mapping: bool = False
    ):
        self.size, self.seq_len, self.vocab_size, self.seed = size, seq_len, vocab_size, seed
        self.mapping = mapping
        self.tokens_per_sample = seq_len  # for tokens/s in the metrics

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        seq = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        if self.mapping:
            return {"input_ids": seq[:-1], "labels": seq[:-1]}
        return seq[:-1], seq[1:]
