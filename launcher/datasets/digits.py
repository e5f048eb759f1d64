"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, no download."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Digits(Dataset):
    """split "train" or "val": a fixed, seeded split with `val_fraction` of the images held out."""

    def __init__(self, split: str = "train", val_fraction: float = 0.2, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the digits dataset comes with scikit-learn: pip install 'launcher[examples]'") from None
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = int(len(x) * val_fraction)
        keep = order[n_val:] if split == "train" else order[:n_val]
        self.x, self.y = x[keep], y[keep]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
