"""Random streams, one per purpose, all derived from the recipe's `seed`.

- model init: torch's global stream seeded with `seed` itself, right before the model is built, so
  nothing built earlier (datasets that draw random numbers in their constructors, a validation set
  or none) changes the initial weights;
- dataset construction: its own stream, derived from (`seed`, "data");
- data order: the sampler's permutation, from `data.seed` (default: `seed`) and the epoch;
- augmentation: each sample's own stream, from (seed, epoch, index) (`data.SeededDataset`);
- dropout and anything else in the step: `seed + rank`, set after the model is built.
"""
from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for `purpose` that is independent of the others and stable across runs and versions."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
