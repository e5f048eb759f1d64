"""Frozen parameters (a LoRA run's base model, or any parameter with requires_grad off) are not
checkpointed: they never change, and they come back from where they were built (model.pretrained,
or the seed). A checkpoint holds the trainable parameters, the buffers and the optimizer state, plus
a fingerprint of the frozen parameters as they were built (sha256 over their names, dtypes, shapes
and bytes). A resume builds the base again, and refuses in one line a base whose fingerprint differs
(another model.pretrained, a hub id whose branch moved, another seed for a base from a config).

model.pt and the hf/ exports still hold the whole model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from launcher.errors import RecipeError

BASE_KEY = "_launcher_frozen_base"  # the fingerprint, beside the trainable tensors in the model's state


def frozen_names(model: nn.Module) -> frozenset[str]:
    """The state-dict names of the parameters that do not train (tied ones under each name)."""
    return frozenset(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)


def trainable_state(state: Mapping[str, Any], frozen: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in frozen}


def fingerprint(model: nn.Module) -> str | None:
    """sha256 of the frozen parameters as built (before any sharding); None if none is frozen or
    they are not built yet (the meta device)."""
    params = sorted((n, p) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
    if not params or any(p.is_meta for _, p in params):
        return None
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(f"{name} {p.dtype} {tuple(p.shape)}".encode())
        data = p.detach().contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def with_base(state: dict[str, Any], base: str | None) -> dict[str, Any]:
    return state if base is None else {**state, BASE_KEY: base}


def check_base(saved: Any, current: str | None, source: str) -> None:
    """The frozen parameters this run built against those the checkpoint was trained on."""
    if saved is None or current is None:
        return  # a checkpoint that keeps no fingerprint, or a base built on the meta device
    saved_text = saved.decode() if isinstance(saved, bytes) else str(saved)
    if saved_text != current:
        raise RecipeError(
            "model",
            f"{source} was trained on another frozen base model (its fingerprint differs): model.pretrained, "
            "its revision or the seed changed since; resume with the base it was trained on (pin model.revision to "
            "a commit), or start afresh with another name=... or run.dir=...",
        )


class Trainable:
    """A whole (unsharded) model as a checkpoint holds it: trainable parameters and buffers, and
    the frozen base's fingerprint."""

    def __init__(self, model: nn.Module, base: str | None, source: str = "the checkpoint") -> None:
        self.model, self.base, self.source = model, base, source
        self.frozen = frozen_names(model)

    def state_dict(self) -> dict[str, Any]:
        return with_base(trainable_state(self.model.state_dict(), self.frozen), self.base)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_base(state_dict.get(BASE_KEY), self.base, self.source)
        tensors = {k: v for k, v in state_dict.items() if k != BASE_KEY}
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        if unexpected or set(missing) - self.frozen:
            raise RecipeError(
                "checkpoint.resume",
                f"{self.source} does not fit the model: missing {sorted(set(missing) - self.frozen)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}; resume it with the recipe that wrote it",
            )
