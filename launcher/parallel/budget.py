"""`launcher check --gpu-memory GIB`: does each rank fit a GPU of that size, and if not, what would?

Before an allocation is spent: per rank, the state kept between steps (parameters, gradients,
optimizer state: `memory.state_plan`, under the chosen layout) plus the activations one micro-batch
keeps for the backward. Activations are measured, not guessed: one forward of the model and loss on
the meta device (shapes only: no memory, no GPU, no time), counting the bytes of every tensor autograd
saves for the backward, with the recipe's activation checkpointing applied (a checkpointed segment
saves its input only). Counted in fp32, halved under bf16/fp16 autocast or FSDP's mixed precision.

What it leaves out: the CUDA context and allocator slack (about 1 GiB: `HEADROOM_BYTES`), the
recomputation peak of one checkpointed segment in the backward, and temporaries inside a kernel.
A model whose forward cannot run on the meta device is judged on its state alone, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launcher.data.batches import LossFn
from launcher.parallel.memory import StateBytes
from launcher.parallel.wrap import TrainModule

HEADROOM_BYTES = 2**30  # the CUDA context, cuBLAS workspaces and the allocator's slack


@dataclass(frozen=True)
class Need:
    """One rank's memory under one setting."""

    state: StateBytes
    activations: int | None  # bytes for one micro-batch; None: not measurable on the meta device

    @property
    def total(self) -> int:
        return self.state.total + (self.activations or 0) + HEADROOM_BYTES


def activation_bytes(
    model: nn.Module, loss_fn: LossFn | None, batch: Any, segments: int, head_chunks: int, half: bool
) -> int | None:
    """Bytes autograd keeps for one micro-batch's backward: `model` and `batch` on the meta device.
    None when the forward cannot run there (a data-dependent branch, `.item()`)."""
    # by the tensor that owns the memory: one several operations save, or several views of one
    # (attention's q, k and v of one projection), are held once
    saved: dict[int, torch.Tensor] = {}
    params = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:  # weights are counted in the state already
            saved[id(base)] = base
        return t

    module = TrainModule(model, loss_fn, segments, head_chunks).train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(batch)
    except Exception:  # noqa: BLE001 - any failure of a meta-device forward means "not measurable"
        return None
    total = sum(t.numel() * t.element_size() for t in saved.values())
    return total // 2 if half else total


def micro_batch_on_meta(sample_batch: Any, micro_batch: int) -> Any:
    """A collated batch of one sample, repeated to `micro_batch` samples, on the meta device."""

    def grow(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            shape = (micro_batch, *value.shape[1:]) if value.dim() else value.shape
            return torch.empty(shape, dtype=value.dtype, device="meta")
        if isinstance(value, dict):
            return {k: grow(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(grow(v) for v in value)
        return value

    return grow(sample_batch)


@dataclass(frozen=True)
class Setting:
    """A change to the recipe and the memory it would need."""

    overrides: str  # as `key=value` overrides, "" for the recipe as it is
    need: Need


def verdict(gib: float, current: Setting, alternatives: list[Setting]) -> tuple[bool, str]:
    """(fits, one line): the recipe's need against `gib`, and the first alternative that fits."""
    limit = int(gib * 2**30)
    what = describe(current.need)
    if current.need.total <= limit:
        return True, f"fits: {what} per rank of {gib:g} GiB"
    fitting = [a for a in alternatives if a.need.total <= limit]
    if not fitting:
        return False, f"does not fit: {what} per rank of {gib:g} GiB, and no single change tried fits"
    best = fitting[0]
    return False, f"does not fit: {what} per rank of {gib:g} GiB; {best.overrides} fits ({describe(best.need)})"


def describe(need: Need) -> str:
    acts = "activations unknown (the model's forward does not run on the meta device)"
    if need.activations is not None:
        acts = f"activations {_gib(need.activations)}"
    return f"{_gib(need.total)} ({_gib(need.state.total)} state + {acts} + {_gib(HEADROOM_BYTES)} headroom)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def alternatives(
    state_for: Callable[[str, int, int], StateBytes | None],
    activations_for: Callable[[int, int], int | None],
    recipe_strategy: str,
    dp_size: int,
    tensor: int,
    world_size: int,
    micro_batch: int,
    segments: int,
    max_segments: int,
) -> list[Setting]:
    """Single changes that use less memory, cheapest in speed first: shard the state (fsdp), split
    the layers (tensor parallelism, at the same world size), checkpoint activations, a smaller
    micro-batch (the global batch kept by accumulation: the same maths). `state_for(strategy, shard,
    tensor)` (None: not possible, a model without a tensor-parallel plan) and
    `activations_for(micro_batch, segments)` measure each."""
    out = []
    acts = activations_for(micro_batch, segments)
    sharded = state_for("fsdp", dp_size, tensor)
    if recipe_strategy == "ddp" and dp_size > 1 and sharded is not None:
        out.append(Setting("dist.strategy=fsdp", Need(sharded, acts)))
    for t in (2, 4, 8):
        split = state_for("fsdp", world_size // t, t) if t > tensor and world_size % t == 0 else None
        if split is not None:
            out.append(Setting(f"dist.tensor_parallel={t}", Need(split, acts)))
    state = state_for(recipe_strategy, dp_size, tensor)
    assert state is not None, "the recipe's own layout was checked before"
    for s in sorted({2, 4, max_segments}):
        if segments < s <= max_segments:
            out.append(
                Setting(f"train.activation_checkpointing.segments={s}", Need(state, activations_for(micro_batch, s)))
            )
    m = micro_batch // 2
    while m >= 1:
        out.append(Setting(f"data.batch_size={m}", Need(state, activations_for(m, segments))))
        m //= 2
    return out
