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
from typing import Any

import torch

from launcher.cluster import distributed


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


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG streams, as tensors and plain values (weights_only-loadable)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        s = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": s["bit_generator"],
            "key": torch.from_numpy(s["state"]["key"].astype("int64")),
            "pos": int(s["state"]["pos"]),
            "has_gauss": int(s["has_gauss"]),
            "gauss": float(s["gauss"]),
        }
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
                "state": {"key": n["key"].numpy().astype("uint32"), "pos": n["pos"]},
            }
        )


class RankStreams:
    """Every rank's RNG streams, as one checkpointed object (Stateful): `state_dict` gathers them
    onto rank 0 (a collective: every rank calls it), `load_state_dict` puts back this rank's own.
    A rank that did not exist when they were saved keeps the streams it has."""

    def __init__(self, rank: int, group: Any = None) -> None:
        self.rank, self.group = rank, group

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": distributed.gather_objects(capture_rng_state(), group=self.group)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        if self.rank < len(ranks):
            restore_rng_state(ranks[self.rank])


def streams_of_ranks(seed: int, ranks: list[int]) -> dict[int, dict[str, Any]]:
    """`launcher debug --simulate-world-size`: the streams each simulated rank starts with, as that
    rank would (seed + rank); the loop swaps them in and out around each rank's micro-batches."""
    streams = {}
    for r in ranks:
        seed_everything(seed + r)
        streams[r] = capture_rng_state()
    return streams
