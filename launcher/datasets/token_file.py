"""Pretraining-scale token files: one flat array of token ids on disk (uint16 or uint32, no header,
as nanoGPT's `train.bin`), memory-mapped, never read whole. `launcher tokenize` writes one.

    data:
      train:
        _component_: launcher.datasets.token_file.TokenFile
        path: data/train.bin
        seq_len: 1024
        windows: random        # or sequential
        samples: 100000        # random windows per epoch (sequential: the file's non-overlapping windows)

Sample i is `(tokens[o : o + seq_len], tokens[o + 1 : o + seq_len + 1])` (inputs, next-token
targets, int64), for the built-in GPT and `launcher.losses.TokenCrossEntropy`. Sequential windows
start at o = i * seq_len; a random window's start is drawn from (seed, i) alone, so it does not
depend on the rank, the worker or a restart: resuming and changing the number of GPUs see the same
samples. Each access reads seq_len + 1 tokens through the page cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.errors import ArgumentError, MissingFile, positive

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenFile(Dataset):
    deterministic = True  # a window depends on (seed, index) only: no per-sample RNG seeding needed

    def __init__(
        self,
        path: str,
        seq_len: int,
        dtype: Literal["uint16", "uint32"] = "uint16",
        windows: Literal["sequential", "random"] = "sequential",
        samples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MissingFile("path", f"{self.path} does not exist; write one with `launcher tokenize`")
        if dtype not in DTYPES:
            raise ArgumentError("dtype", f"{dtype!r} is not one of {sorted(DTYPES)}")
        if windows not in ("sequential", "random"):
            raise ArgumentError("windows", f"{windows!r} is not 'sequential' or 'random'")
        positive("seq_len", seq_len, optional=False)
        positive("samples", samples)
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        size = self.path.stat().st_size
        if size % itemsize:
            raise ArgumentError("dtype", f"{self.path} has {size} bytes, not a whole number of {dtype} tokens")
        self.n_tokens = size // itemsize
        if self.n_tokens < seq_len + 1:
            raise ArgumentError("seq_len", f"{self.path} holds {self.n_tokens} tokens, fewer than seq_len + 1")
        self.seq_len, self.dtype, self.windows, self.seed = seq_len, dtype, windows, seed
        sequential = (self.n_tokens - 1) // seq_len
        self.length = samples if samples is not None and windows == "random" else sequential
        self._tokens: np.memmap | None = None  # opened in each process that reads (DataLoader workers too)

    def __len__(self) -> int:
        return self.length

    @property
    def tokens_per_sample(self) -> int:  # for tokens/s in the metrics
        return self.seq_len

    @property
    def max_sequence_length(self) -> int:
        return self.seq_len

    def max_token_id(self, vocab_size: int) -> int | None:
        """The file's largest token id, if it could reach `vocab_size` (launcher/data/fit.py): read
        once, in blocks (the process does not grow with the file); None when the dtype cannot."""
        if np.iinfo(DTYPES[self.dtype]).max < vocab_size:
            return None
        largest, block = 0, 1 << 24
        with self.path.open("rb") as f:
            while chunk := f.read(block * np.dtype(DTYPES[self.dtype]).itemsize):
                largest = max(largest, int(np.frombuffer(chunk, dtype=DTYPES[self.dtype]).max()))
        return largest

    def start(self, index: int) -> int:
        if self.windows == "sequential":
            return index * self.seq_len
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % (self.n_tokens - self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r")
        o = self.start(index)
        window = torch.from_numpy(self._tokens[o : o + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the map rather than pickle it
        return {**self.__dict__, "_tokens": None}
