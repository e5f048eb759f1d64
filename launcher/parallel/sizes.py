"""Sizes no machine holds, caught before anything is allocated. A model is built on the meta device
at `launcher check`, so a typo of a few zeros (`model.seq_len=2000000000`) builds there and fails
only in the run, at the allocator. These bounds are far above any real model (the largest tensors
of public models are tens of GiB, their weights a few TiB) and below what would fail anywhere: a
model past them is a mistake, not a machine too small (that is `check`'s memory-plan warning)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from launcher.errors import RecipeError

TENSOR_BYTES = 2**40  # one tensor of 1 TiB: no accelerator holds it, nor the host of any rank
MODEL_BYTES = 2**46  # 64 TiB of weights: 16 trillion float32 parameters, several times the largest model


def describe(n: int) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30)):
        if n >= scale:
            return f"{n / scale:,.3g} {unit}"
    return f"{n:,} B"


def check(model: nn.Module, spec: Mapping[str, Any], key: str = "model") -> None:
    """RecipeError on a parameter past TENSOR_BYTES or weights past MODEL_BYTES (shapes alone: a
    meta-device model will do), naming the recipe's setting that gave its largest dimension."""
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if size > TENSOR_BYTES:
            shape = " x ".join(f"{d:,}" for d in p.shape)
            where = _setting(spec, key, max(p.shape))
            raise RecipeError(
                where or key,
                f"the parameter {name} alone is {shape} {str(p.dtype).removeprefix('torch.')} = {describe(size)}, "
                f"more than any device or host holds (the run would fail allocating it); "
                f"{'a few zeros too many?' if where else 'check the sizes in ' + key}",
            )
    if total > MODEL_BYTES:
        count = sum(p.numel() for p in model.parameters())
        raise RecipeError(
            key,
            f"the model has {count:,} parameters ({describe(total)} of weights alone), far beyond any "
            f"cluster's memory; check its sizes ({_sizes(spec, key)})",
        )


def _setting(spec: Mapping[str, Any], key: str, value: int) -> str | None:
    """The recipe key under `spec` (at `key`) set to `value`, if exactly one is."""
    found = [k for k, v in _ints(spec, key) if v == value]
    return found[0] if len(found) == 1 else None


def _sizes(spec: Mapping[str, Any], key: str) -> str:
    ints = sorted(_ints(spec, key), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{k}={v:,}" for k, v in ints) or "none given in the recipe"


def _ints(spec: Mapping[str, Any], key: str) -> Iterator[tuple[str, int]]:
    for name, value in spec.items():
        if isinstance(value, Mapping):
            yield from _ints(value, f"{key}.{name}")
        elif isinstance(value, list | tuple):  # an MLP's sizes: the list's key
            yield from ((f"{key}.{name}", v) for v in value if isinstance(v, int) and not isinstance(v, bool))
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{key}.{name}", value
