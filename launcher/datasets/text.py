"""Byte-level language-modelling text: any UTF-8 file, or by default Python's own standard library
source, which ships with every Python (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset


def stdlib_corpus(max_bytes: int) -> bytes:
    root = Path(os.__file__).parent
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources in {root} (stripped install?); set path to a text file")
    out = bytearray()
    for f in files:
        out += f.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


class ByteText(Dataset):
    """Non-overlapping windows of `seq_len` bytes; the target is the input shifted by one byte.
    The last `val_fraction` of the text is the "val" split."""

    deterministic = True  # no randomness in __getitem__: no per-sample seeding needed

    def __init__(
        self,
        path: str | None = None,
        split: str = "train",
        seq_len: int = 256,
        val_fraction: float = 0.1,
        max_bytes: int = 4_000_000,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if path is None:
            raw = stdlib_corpus(max_bytes)
        else:
            p = Path(path).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"no such text file: {p}")
            raw = p.read_bytes()[:max_bytes]
        cut = int(len(raw) * (1 - val_fraction))
        data = raw[:cut] if split == "train" else raw[cut:]
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len
        if len(self) == 0:
            raise ValueError(f"the {split} split has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}")

    @property
    def tokens_per_sample(self) -> int:  # for tokens/s in the metrics
        return self.seq_len

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]
