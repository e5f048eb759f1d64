"""The batch arithmetic of a run, derived once from the recipe, the world size and the data size.

Definitions (N train samples, W ranks, b micro-batch, A accumulation steps, G = b*A*W):
- Step k of an epoch (one optimizer step, a "window") trains on samples p[k*G : (k+1)*G] of the
  epoch's permutation p, whatever W and A are: DistributedSampler deals p out round-robin, so rank r
  holds p[r], p[r+W], ..., and its micro-batches k*A .. k*A+A-1 cover exactly that slice. This is
  why a recipe's results do not depend on how many ranks run it.
- The last window of an epoch may be partial; its loss is the mean over its real samples.
- DistributedSampler pads each epoch to a multiple of W by repeating samples; those repeats are
  not real samples and get no weight. With drop_last, partial windows are dropped instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.errors import RecipeError
from launcher.recipe.schema import ActivationCheckpointing, Recipe

if TYPE_CHECKING:
    from launcher.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Plan:
    world_size: int  # ranks (or simulated ranks)
    dp_size: int  # data-parallel ranks: each reads its own share of a step's batch (world_size / tensor_parallel)
    micro_batch: int
    accumulation: int
    global_batch: int
    train_samples: int
    val_samples: int | None
    drop_last: bool
    steps_per_epoch: int
    total_steps: int
    epochs: int
    backend: str
    device: str
    checkpointing: str  # how activation checkpointing is set, in words
    mesh: str = ""  # the layout of the ranks, in words (`4 ranks = 1 replicate x 2 shard x 2 tensor`)
    # a stream: its "epoch" is the run (max_steps x the global batch), and never ends, so that a
    # longer max_steps continues the stream where it stopped instead of starting it again
    streamed: bool = False

    @property
    def shard_stop(self) -> int:
        """How many samples of its shard each rank takes per epoch."""
        if self.drop_last:
            return self.steps_per_epoch * self.accumulation * self.micro_batch
        return math.ceil(self.train_samples / self.dp_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.shard_stop / self.micro_batch)

    def window_samples(self, step_in_epoch: int) -> int:
        """Real samples (over all ranks) in optimizer step `step_in_epoch` of an epoch."""
        return min(self.global_batch, self.train_samples - step_in_epoch * self.global_batch)

    def window_micro_batches(self, step_in_epoch: int) -> int:
        first = step_in_epoch * self.accumulation
        return min(self.accumulation, self.micro_batches_per_epoch - first)

    def real_in_micro_batch(self, micro_index: int, rank: int) -> int:
        """Samples of micro-batch `micro_index` on `rank` that are real, not DistributedSampler padding."""
        start = micro_index * self.micro_batch
        end = min(start + self.micro_batch, self.shard_stop)
        real_end = math.ceil((self.train_samples - rank) / self.dp_size)  # shard positions < this are real
        return max(0, min(end, real_end) - start)

    def describe(self) -> list[tuple[str, str]]:
        return [
            ("world size", str(self.world_size)),
            *([("mesh", self.mesh)] if self.mesh and self.world_size > 1 else []),
            ("backend / device", f"{self.backend} / {self.device}"),
            ("micro-batch per rank", str(self.micro_batch)),
            ("accumulation steps", str(self.accumulation)),
            ("global batch", f"{self.global_batch} (= {self.micro_batch} x {self.accumulation} x {self.dp_size})"),
            (
                "train / val samples",
                f"{self.train_samples} / {self.val_samples if self.val_samples is not None else '-'}",
            ),
            (
                "steps per epoch",
                "none: a stream, read on through the run"
                if self.streamed
                else f"{self.steps_per_epoch}"
                + (" (last window partial)" if self.train_samples % self.global_batch and not self.drop_last else ""),
            ),
            ("total optimizer steps", f"{self.total_steps} ({self.epochs} epoch{'s' if self.epochs != 1 else ''})"),
            ("checkpoint segments", self.checkpointing),
        ]


@dataclass(frozen=True)
class BatchShape:
    global_batch: int
    micro_batch: int  # per rank
    accumulation: int


def batch_shape(recipe: Recipe, world_size: int) -> BatchShape:
    """The global batch, the per-rank micro-batch and the accumulation steps. The global batch must
    split evenly over ranks and micro-batches; with data.fit_batch_size, data.batch_size is the
    largest micro-batch, and the largest one up to it that splits the global batch is used."""
    b, W = recipe.data.batch_size, world_size
    G = recipe.train.global_batch_size or b * W
    if G % (b * W) and recipe.data.fit_batch_size and recipe.train.global_batch_size and G % W == 0:
        per_rank = G // W
        b = max(d for d in range(1, min(b, per_rank) + 1) if per_rank % d == 0)
    if G % (b * W):
        lower = max(b * W, G // (b * W) * b * W)
        fit = (
            ""
            if recipe.data.fit_batch_size
            else "; or set data.fit_batch_size=true to use a smaller micro-batch where it must"
        )
        raise RecipeError(
            "train.global_batch_size",
            f"{G} is not a multiple of data.batch_size x world size = {b} x {W} = {b * W}; "
            f"use {lower} or {lower + b * W}, or change data.batch_size{fit}",
        )
    return BatchShape(G, b, G // (b * W))


def check_ranks(recipe: Recipe, world_size: int) -> None:
    """Settings that name ranks must name ranks that exist."""
    profile = recipe.log.profile
    bad = next((r for r in profile.ranks if r >= world_size), None) if profile is not None else None
    if bad is not None:
        raise RecipeError(
            "log.profile.ranks",
            f"rank {bad} does not exist at world size {world_size}; list ranks from 0 to {world_size - 1}",
        )


def build_plan(
    recipe: Recipe,
    dims: ParallelDims,
    train_samples: int,
    val_samples: int | None,
    backend: str,
    device: str,
    streamed: bool = False,
) -> Plan:
    W, t = dims.dp_size, recipe.train
    shape = batch_shape(recipe, W)
    G, A, b = shape.global_batch, shape.accumulation, shape.micro_batch
    if train_samples <= 0:
        raise RecipeError("data.train", "the training dataset is empty")
    check_ranks(recipe, dims.world_size)
    if recipe.data.drop_last:
        steps_per_epoch = train_samples // G
        if steps_per_epoch == 0:
            raise RecipeError(
                "data.drop_last",
                f"the dataset has {train_samples} samples, fewer than one global batch ({G}), so every batch "
                "would be dropped; set data.drop_last=false or use a smaller batch",
            )
    else:
        steps_per_epoch = math.ceil(train_samples / G)
    if t.max_steps is not None and t.epochs is not None:
        total = min(t.max_steps, t.epochs * steps_per_epoch)
    elif t.max_steps is not None:
        total = t.max_steps
    else:
        assert t.epochs is not None  # the recipe's rules require one of the two
        total = t.epochs * steps_per_epoch
    return Plan(
        world_size=dims.world_size,
        dp_size=W,
        mesh=dims.describe(),
        micro_batch=b,
        accumulation=A,
        global_batch=G,
        train_samples=train_samples,
        val_samples=val_samples,
        drop_last=recipe.data.drop_last,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=math.ceil(total / steps_per_epoch),
        backend=backend,
        device=device,
        checkpointing=describe_checkpointing(t.activation_checkpointing),
        streamed=streamed,
    )


def describe_checkpointing(ac: ActivationCheckpointing) -> str:
    if ac.segments == "auto":
        budget = f"{ac.max_memory_gib:g} GiB" if ac.max_memory_gib else "90% of the GPU"
        return f"auto (fewest that fit {budget}; chosen at start)"
    parts = [f"{ac.segments}" if ac.segments else "off"]
    if ac.head_chunks:
        parts.append(f"last module + loss in {ac.head_chunks} chunks")
    return ", ".join(parts)


def plan_warnings(recipe: Recipe, plan: Plan, device_type: str) -> list[str]:
    """Settings that work but are likely not what the user meant, for `check` and the run's start."""
    from launcher.cluster.cpu import precision_warning

    out = []
    slow = precision_warning(recipe.train.precision, device_type)
    if slow:
        out.append(slow)
    scheduler = recipe.scheduler or {}
    t_max = scheduler.get("T_max")
    if scheduler.get("_component_", "").endswith("CosineAnnealingLR") and isinstance(t_max, int):
        annealed = plan.total_steps - recipe.train.warmup_steps
        if annealed > t_max:
            out.append(
                f"scheduler.T_max={t_max}, but {annealed} steps follow the warmup: CosineAnnealingLR is "
                f"periodic, so the learning rate climbs back up from eta_min after step "
                f"{t_max + recipe.train.warmup_steps}; set scheduler.T_max={annealed}"
            )
    return out
