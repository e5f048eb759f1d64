"""`activation_checkpointing.segments: auto`: probe, then pick the least recomputation that fits.

Each candidate runs one forward and backward on the first micro-batch, measuring peak memory and
time; the first (least recomputation) whose peak plus the optimizer's future state fits the budget
wins. Probes change nothing: their gradients are dropped, and the RNG streams and buffers (BatchNorm
statistics) are restored afterwards, so the run computes exactly what it would with that setting
chosen by hand. All ranks adopt the most conservative choice of any rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from launcher.cluster import distributed
from launcher.data.batches import LossFn
from launcher.data.loading import to_device, workers_stopped_on_error
from launcher.observe.logs import log
from launcher.parallel.wrap import TrainModule
from launcher.recipe.schema import ActivationCheckpointing
from launcher.rng import capture_rng_state, restore_rng_state

HEAD_CHUNKS = 8


@dataclass
class Probe:
    segments: int
    head_chunks: int
    peak_gib: float | None  # None: out of memory
    step_s: float | None


def candidates(model: nn.Module) -> list[tuple[int, int]]:
    """Ordered from least to most recomputation."""
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        return [(0, 0)]
    body = len(model) - 1
    segments = sorted({s for s in (1, 2, 3, 4, 6, 8, 12, 16, body) if s <= body})
    return [(0, 0), (0, HEAD_CHUNKS)] + [(s, HEAD_CHUNKS) for s in segments]


def choose(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: tuple[Any, torch.Tensor],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    budget_gib: float | None,
    optimizer_state_gib: float,
) -> tuple[int, int, list[Probe]]:
    """(segments, head_chunks, the probes made). On CPU there is no device memory to measure: (0, 0)."""
    if device.type != "cuda":
        log.warning("activation_checkpointing.segments=auto measures GPU memory; on CPU it turns checkpointing off")
        return 0, 0, []
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    budget = budget_gib if budget_gib is not None else 0.9 * total
    rng = capture_rng_state()
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    probes: list[Probe] = []
    chosen = None
    for segments, chunks in candidates(model):
        probe = _measure(TrainModule(model, loss_fn, segments, chunks), batch, device, autocast)
        probe.segments, probe.head_chunks = segments, chunks
        probes.append(probe)
        if probe.peak_gib is not None and probe.peak_gib + optimizer_state_gib <= budget:
            chosen = (segments, chunks)
            break
    restore_rng_state(rng)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    torch.cuda.reset_peak_memory_stats(device)  # from here on the peak is the training run's
    if chosen is None:
        chosen = (probes[-1].segments, probes[-1].head_chunks)
        log.warning(f"no checkpointing setting fits {budget:.1f} GiB; using the most economical one")
    # every rank must run the same program: take the most recomputation any rank needs
    order = candidates(model)
    index = torch.tensor([order.index(chosen)], device=device)
    distributed.all_reduce(index, op=torch.distributed.ReduceOp.MAX)
    segments, chunks = order[int(index.item())]
    rows = "; ".join(
        f"{p.segments} seg/{p.head_chunks} head chunks: "
        + (f"{p.peak_gib:.2f} GiB, {(p.step_s or 0) * 1e3:.0f} ms" if p.peak_gib is not None else "out of memory")
        for p in probes
    )
    log.info(
        f"activation checkpointing auto (budget {budget:.1f} GiB incl. {optimizer_state_gib:.2f} GiB optimizer "
        f"state): {rows} -> {segments} segments, head in {chunks or 'no'} chunks"
    )
    return segments, chunks, probes


def _measure(
    module: TrainModule,
    batch: Any,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> Probe:
    module.train()
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with autocast():
            loss = module(batch)
        loss.backward()
        torch.cuda.synchronize(device)
        return Probe(0, 0, torch.cuda.max_memory_allocated(device) / 2**30, time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return Probe(0, 0, None, None)
    finally:
        for p in module.parameters():
            p.grad = None
        torch.cuda.empty_cache()


def state_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Roughly what a checkpoint and the final weights take: the weights, and two optimizer moments
    per parameter (AdamW's), plus model.pt."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * weights


def checkpointed_state_bytes(model: torch.nn.Module) -> int:
    """Roughly what one checkpoint holds: trainable weights with two optimizer moments each
    (AdamW's), and buffers; frozen parameters are not checkpointed (launcher/checkpoint/frozen.py)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * trainable + sum(b.numel() * b.element_size() for b in model.buffers())


def local_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds: its shards under FSDP (a DTensor's
    local part), everything under DDP. Measured, not estimated."""

    def local(t: torch.Tensor) -> int:
        part = t.to_local() if hasattr(t, "to_local") else t
        return part.numel() * part.element_size()

    weights = sum(local(p) for p in params)
    states = sum(local(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return weights + states


def resolve_segments(
    ac: ActivationCheckpointing,
    model: nn.Module,
    loss_fn: LossFn | None,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[int, int]:
    """Activation checkpointing's (segments, head_chunks): from the recipe, or probed (segments: auto)."""
    if ac.segments != "auto":
        return ac.segments, ac.head_chunks
    # Adam-like optimizers will hold two tensors per parameter once they step
    state_gib = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    stream = iter(loader)
    with workers_stopped_on_error([stream]):  # a bad first row must not leave workers holding the exit
        batch = to_device(next(stream), device)
    segments, chunks, _ = choose(model, loss_fn, batch, device, autocast, ac.max_memory_gib, state_gib)
    return segments, chunks


@dataclass(frozen=True)
class StateBytes:
    """What one rank keeps between steps (no activations): parameters, gradients, optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def optimizer_moments(optimizer: dict[str, Any]) -> int:
    """State tensors per parameter the recipe's optimizer keeps: Adam's family 2, SGD with momentum
    1, plain SGD 0; anything else is counted as 2 (the common case)."""
    name = str(optimizer.get("_component_", "")).rsplit(".", 1)[-1]
    if name == "SGD":
        return 1 if optimizer.get("momentum") else 0
    return 2


def state_plan(
    model: nn.Module, moments: int, ranks_per_shard: int, tensor: int = 1, split: frozenset[int] = frozenset()
) -> StateBytes:
    """Per rank, from the parameters' shapes alone (a meta-device model will do). FSDP shards each
    tensor along its first dimension over `ranks_per_shard` ranks (padding it to a multiple of it);
    1: every rank holds everything (ddp). `split`: ids of the parameters tensor parallelism splits
    over `tensor` ranks first. Frozen parameters (an adapter's base) have no gradient or optimizer
    state: charging them would overstate LoRA on a large base several times over."""
    params = trained = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        per_row = p.numel() // max(rows, 1) // (tensor if id(p) in split else 1)
        size = -(-rows // ranks_per_shard) * per_row * p.element_size()
        params += size
        trained += size if p.requires_grad else 0
    return StateBytes(params, trained, moments * trained)


def describe_parameters(model: nn.Module) -> str:
    """`124,439,808`, or with frozen parameters (model.peft) `124,734,720, of which 294,912 train (0.24%)`."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained == total:
        return f"{total:,}"
    return f"{total:,}, of which {trained:,} train ({100 * trained / max(total, 1):.2g}%)"
