"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def _load() -> Any:  # a numpy array
    """The 1797 x 65 table (64 pixels, then the label) scikit-learn ships, read without importing
    scikit-learn itself (a second of start-up); through load_digits if the file has moved."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the digits dataset comes with scikit-learn: pip install 'launcher[examples]'")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.column_stack([data.data, data.target])


class Digits(Dataset):
    """split "train" or "val": a fixed, seeded split with `val_fraction` of the images held out."""

    deterministic = True  # no randomness in __getitem__: no per-sample seeding needed

    def __init__(self, split: str = "train", val_fraction: float = 0.2, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        table = _load()
        x = torch.tensor(table[:, :-1], dtype=torch.float32) / 16.0  # pixel values are 0..16
        y = torch.tensor(table[:, -1], dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = int(len(x) * val_fraction)
        keep = order[n_val:] if split == "train" else order[:n_val]
        self.x, self.y = x[keep], y[keep]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
