"""Pipeline parallelism's plan and schedule, on torch.distributed.pipelining.

- `stage_layers`: which blocks each stage holds (stage 0 also the embeddings, the last stage the
  final norm, the head and the loss); `stage_ids`: which stages a pipeline rank runs.
- `check_torch`, `check_micro_batches`: what the installed torch and the window allow, as one line.
- `build_schedule`: torch's schedule over this rank's stages, with `WeightedLoss`, so that each
  micro-batch's mean loss is weighted as the launcher weights micro-batches without pipelining
  (launcher/train/window.py) and `scale_grads` is off: torch's default divides by the number of
  micro-batches, a mean of micro-batch means, which is wrong when they count different tokens.
- `bubble_fraction`: the idle share of a step, for `launcher check`.

The models are split in launcher/parallel/pipeline_split.py; the window's micro-batches are made one
shape in launcher/parallel/pipeline_batches.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from launcher.errors import RecipeError

PP_KEY = "dist.pipeline_parallel"
SCHEDULE_KEY = "dist.pipeline.schedule"
SPLIT_KEY = "dist.pipeline.split"
STAGES_KEY = "dist.pipeline.stages_per_rank"
MICRO_KEY = "train.global_batch_size"  # a window's micro-batches: global batch / (batch size x data ranks)

# The oldest torch whose 1F1B family is exact on CPU with gloo (measured; torch 2.5's 1F1B hangs,
# pytorch #132644).
PIPELINE_TORCH = (2, 8)


@dataclass(frozen=True)
class Schedule:
    torch_name: str  # torch.distributed.pipelining.schedules.get_schedule_class's name
    min_torch: tuple[int, int]
    placement: str  # "loop": stage s on rank s % pp; "v": rank r holds stages r and 2 pp - 1 - r
    stages_per_rank: tuple[int, int | None]  # the fewest and the most (None: no limit)
    zero_bubble: bool = False  # the backward split into input and weight gradients


SCHEDULES = {
    "gpipe": Schedule("GPipe", PIPELINE_TORCH, "loop", (1, 1)),
    "1f1b": Schedule("1F1B", PIPELINE_TORCH, "loop", (1, 1)),
    "interleaved_1f1b": Schedule("Interleaved1F1B", PIPELINE_TORCH, "loop", (2, None)),
    # measured: on torch 2.8 to 2.10 the V schedules send from a rank to itself and hang; 2.13 runs them.
    # Interleaved zero bubble was not measured below 2.13: it is held to the same bound.
    "interleaved_zb": Schedule("InterleavedZeroBubble", (2, 13), "loop", (2, None), zero_bubble=True),
    "zbv": Schedule("ZBVZeroBubble", (2, 13), "v", (2, 2), zero_bubble=True),
    "dualpipev": Schedule("DualPipeV", (2, 13), "v", (2, 2), zero_bubble=True),
}


def schedule_of(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise RecipeError(SCHEDULE_KEY, f"{name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def torch_version(version: str | None = None) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version or torch.__version__).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


def check_torch(schedule: str, version: str | None = None) -> None:
    """One line when the installed torch (or `version`) cannot run the schedule exactly."""
    have, need = torch_version(version), schedule_of(schedule).min_torch
    shown = version or torch.__version__
    if have < PIPELINE_TORCH:
        raise RecipeError(
            PP_KEY,
            f"pipeline parallelism needs torch >= {_v(PIPELINE_TORCH)} (torch {shown}'s pipelining is not exact "
            "or hangs, pytorch #132644); upgrade torch or set dist.pipeline_parallel: 1",
        )
    if have < need:
        raise RecipeError(
            SCHEDULE_KEY,
            f"{schedule} needs torch >= {_v(need)} (on torch {shown} it hangs, sending from a rank to itself); "
            "upgrade torch or choose gpipe, 1f1b or interleaved_1f1b",
        )


def _v(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def check_stages_per_rank(schedule: str, stages_per_rank: int) -> None:
    low, high = schedule_of(schedule).stages_per_rank
    if isinstance(stages_per_rank, bool) or not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise RecipeError(STAGES_KEY, f"{stages_per_rank!r} is not a count of stages: give a whole number >= 1")
    if stages_per_rank < low or (high is not None and stages_per_rank > high):
        wants = f"exactly {low}" if low == high else f"at least {low}"
        raise RecipeError(
            STAGES_KEY,
            f"{schedule} runs {wants} stage(s) per rank, not {stages_per_rank}; "
            + ("choose interleaved_1f1b for more" if high == 1 else f"set it to {low}"),
        )


def stage_layers(
    n_blocks: int, pp_size: int, stages_per_rank: int = 1, split: Sequence[int] | None = None
) -> list[range]:
    """The blocks of each of the pp_size x stages_per_rank stages, in stage order.

    `split` (`dist.pipeline.split`) lists, in block numbers, where stages 1, 2, ... start: with 8 blocks
    and 2 stages, [3] gives stage 0 blocks 0-2 (and the embeddings), stage 1 blocks 3-7 (and the final
    norm, head and loss). It is strictly increasing within 0..n_blocks, so that every middle stage holds
    a block; 0 leaves stage 0 only the embeddings, n_blocks leaves the last stage only the head.

    Without it the blocks are split evenly; the blocks left over go to the middle stages first, then to
    stage 0, then to the last, which already holds the head and the loss (the heaviest with a large
    vocabulary).
    """
    if isinstance(pp_size, bool) or not isinstance(pp_size, int) or pp_size < 1:
        raise RecipeError(PP_KEY, f"{pp_size!r} is not a count of ranks: give a whole number >= 1")
    if isinstance(stages_per_rank, bool) or not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise RecipeError(STAGES_KEY, f"{stages_per_rank!r} is not a count of stages: give a whole number >= 1")
    n_stages = pp_size * stages_per_rank
    if split is None:
        if n_stages > n_blocks:
            key = STAGES_KEY if stages_per_rank > 1 else PP_KEY
            raise RecipeError(
                key,
                f"{n_stages} stages ({pp_size} ranks x {stages_per_rank} per rank) for a model of {n_blocks} blocks: "
                "each stage needs at least one; lower dist.pipeline_parallel or dist.pipeline.stages_per_rank",
            )
        base, extra = divmod(n_blocks, n_stages)
        middle = list(range(1, n_stages - 1))
        gets_extra = set((middle + [0, n_stages - 1])[:extra])
        starts = [0]
        for s in range(n_stages - 1):
            starts.append(starts[-1] + base + (s in gets_extra))
    else:
        starts = [0, *_checked_split(split, n_blocks, n_stages)]
    ends = [*starts[1:], n_blocks]
    return [range(a, b) for a, b in zip(starts, ends, strict=True)]


def _checked_split(split: Sequence[int], n_blocks: int, n_stages: int) -> list[int]:
    values = list(split) if isinstance(split, (list, tuple)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise RecipeError(SPLIT_KEY, f"{split!r} is not a list of block numbers, e.g. [3] for 2 stages")
    if len(values) != n_stages - 1:
        raise RecipeError(
            SPLIT_KEY,
            f"{values} gives {len(values) + 1} stages, but there are {n_stages} (dist.pipeline_parallel x "
            f"dist.pipeline.stages_per_rank): list the first block of stages 1 to {n_stages - 1}",
        )
    if any(v < 0 or v > n_blocks for v in values) or any(a >= b for a, b in pairwise(values)):
        raise RecipeError(
            SPLIT_KEY,
            f"{values} must be strictly increasing block numbers within 0..{n_blocks} "
            f"(the model has {n_blocks} blocks)",
        )
    return values


def stage_ids(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages rank `pp_rank` runs: torch's "loop" placement (stage s on rank s % pp_size), or for the
    V schedules (ZBV, DualPipeV) its "v" one: rank r holds stages r and 2 pp_size - 1 - r, so that the
    first and the last stage share rank 0 (torch's generate_stage_to_rank_mapping, style="v")."""
    if schedule_of(schedule).placement == "v":
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + s * pp_size for s in range(stages_per_rank)]


def check_micro_batches(schedule: str, pp_size: int, stages_per_rank: int, n_micro: int) -> None:
    """One line for a window whose micro-batches the schedule cannot run (torch's own checks, and
    an interleaved schedule needs one micro-batch per stage at least)."""
    n_stages = pp_size * stages_per_rank
    s = schedule_of(schedule)
    if schedule == "1f1b" and n_micro < pp_size:
        raise RecipeError(
            MICRO_KEY,
            f"1f1b needs at least one micro-batch per stage ({pp_size}), and a window has {n_micro}; "
            "raise train.global_batch_size or lower data.batch_size",
        )
    if stages_per_rank > 1 or s.placement == "v":
        if n_micro < n_stages:
            raise RecipeError(
                MICRO_KEY,
                f"{schedule} needs at least one micro-batch per stage ({n_stages}: {pp_size} ranks x "
                f"{stages_per_rank}), and a window has {n_micro}; "
                "raise train.global_batch_size or lower data.batch_size",
            )
        rounds = max(1, n_micro // pp_size)
        if s.placement == "loop" and n_micro % rounds:
            raise RecipeError(
                MICRO_KEY,
                f"{schedule} runs micro-batches in rounds of {pp_size} (the ranks), so a window's count must divide "
                f"into {rounds} equal rounds; {n_micro} does not: make it a multiple of {pp_size}",
            )


def bubble_fraction(schedule: str, pp_size: int, stages_per_rank: int, n_micro: int) -> float:
    """The share of a step each rank idles, with equal times per stage and micro-batch.

    - gpipe and 1f1b: (p - 1) / (m + p - 1): p - 1 slots of filling and draining around m of work
      (GPipe, Huang et al. 2019, section 2.2; 1F1B has the same bubble and less activation memory,
      Narayanan et al. 2021, "Efficient large-scale language model training on GPU clusters", 2.2.1);
    - interleaved_1f1b: (p - 1) / (v m + p - 1): each of v stages per rank is 1/v of the work, so the
      fill and drain shrink v times (Narayanan et al. 2021, 2.2.2, bubble time (1/v)(p - 1)/m of the ideal);
    - zero-bubble schedules: the backward is split into input and weight gradients, and the weight
      gradients fill the bubble; under equal forward, input- and weight-backward times, ZB-H1 leaves
      (p - 1) of 3 m units (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", 3.1), counted here
      like interleaving for v stages per rank: (p - 1) / (3 v m + p - 1). An upper estimate: ZB-V and
      DualPipeV come close to no bubble once m >= 2p.
    """
    p, v, m = pp_size, stages_per_rank, n_micro
    if p <= 1:
        return 0.0
    s = schedule_of(schedule)
    if s.zero_bubble:
        return (p - 1) / (3 * v * m + p - 1)
    if s.stages_per_rank[1] == 1:
        return (p - 1) / (m + p - 1)
    return (p - 1) / (v * m + p - 1)


class WeightedLoss:
    """The loss function handed to the schedule: micro-batch i's mean loss times weights[i].

    The weights are the launcher's (launcher/train/window.py): k_i W / K for a token loss, k_i the
    micro-batch's valid tokens and K the window's over every data-parallel rank, or n_i W / N for a
    sample loss; `begin(weights)` before each `schedule.step`. A micro-batch's target carries its index
    in a last column (pipeline_batches.schedule_inputs), which picks its weight: not a count of calls,
    since torch calls the loss once more at the first step, to infer the stages' shapes, and a counter
    would shift every weight by one. The index is read on the device, with no host sync.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]):
        self.loss_fn = loss_fn
        self.weights: list[float | torch.Tensor] = []
        self._stacked: torch.Tensor | None = None

    def begin(self, weights: Sequence[float | torch.Tensor]) -> None:
        self.weights, self._stacked = list(weights), None

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        index, labels = target[:, -1], target[:, :-1]
        if self._stacked is None or self._stacked.device != target.device:
            self._stacked = torch.stack(
                [torch.as_tensor(w, dtype=torch.float32).to(target.device).reshape(()) for w in self.weights]
            )
        loss = self.loss_fn(output, labels)
        return loss * self._stacked[index[0]].to(loss.dtype)


def build_stages(modules: list[nn.Module], ids: list[int], n_stages: int, group: Any, device: torch.device) -> list:
    """torch's PipelineStage for each of this rank's stage modules (their shapes are inferred at the
    first step, so every step's micro-batches must have the same shapes: pipeline_batches.py)."""
    from torch.distributed.pipelining import PipelineStage

    return [PipelineStage(m, i, n_stages, device, group=group) for m, i in zip(modules, ids, strict=True)]


def build_schedule(stages: list, schedule: str, n_micro: int, loss: WeightedLoss) -> Any:
    """torch's schedule over this rank's stages (from build_stages), with scale_grads off: the
    weights in `loss` already make the step's gradient the window's mean."""
    check_torch(schedule)
    s = schedule_of(schedule)
    pp_size = stages[0].group_size
    check_stages_per_rank(schedule, len(stages))
    check_micro_batches(schedule, pp_size, len(stages), n_micro)
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    cls = get_schedule_class(s.torch_name)
    if issubclass(cls, PipelineScheduleSingle):
        return cls(stages[0], n_microbatches=n_micro, loss_fn=loss, scale_grads=False)
    return cls(stages, n_microbatches=n_micro, loss_fn=loss, scale_grads=False)


def grad_norm(params: list[torch.Tensor], pp_group: Any) -> torch.Tensor:
    """The 2-norm of the gradients of every stage: each rank's sum of squares (over its stages, and
    over FSDP/TP shards as launcher/parallel/gradients.py does) all-reduced over the pipeline group."""
    import torch.distributed as dist

    from launcher.parallel.gradients import grad_norm as local_norm

    squares = local_norm(params).square()
    dist.all_reduce(squares, group=pp_group)
    return squares.sqrt()
