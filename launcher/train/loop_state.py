"""The training loop's state, typed: where the run is (TrainState, saved in checkpoints), what
accumulates between two log rows (LogWindow), and everything the loop works on (Trainer)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from launcher.cluster.distributed import Session
from launcher.data.batches import Counting, LossFn
from launcher.data.loading import Positioned
from launcher.data.plan import Plan
from launcher.parallel.strategy import Strategy
from launcher.recipe.schema import Recipe

if TYPE_CHECKING:  # annotations only
    from torch.optim.lr_scheduler import LRScheduler

    from launcher.checkpoint.checkpointer import Checkpointer, Stateful
    from launcher.cluster.cpu import StepTimeEstimate
    from launcher.cluster.signals import Agreement, PreemptionFlag
    from launcher.observe.heartbeat import Heartbeat
    from launcher.observe.metrics import Metrics
    from launcher.observe.profiling import StepProfiler


@dataclass
class TrainState:
    """Where the run is. Everything needed to continue exactly from an optimizer-step boundary."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    best_metric: float | None = None
    bad_evals: int = 0
    stop_reason: str | None = None
    last_eval_step: int = -1
    last_checkpoint_step: int = -1
    skipped_steps: int = 0  # non-finite steps skipped (train.on_nonfinite=skip)
    consecutive_skips: int = 0  # of those, how many in a row up to now
    pending_eval: bool = False  # an evaluation was cut short by a stop signal: run it first on resume

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        # a resumed run continues: whatever stopped the saved one is over, and its checkpoint is this step's
        self.stop_reason = None
        self.last_checkpoint_step = self.step


@dataclass
class LogWindow:
    """What accumulates on this rank between two log rows. The loss stays on the device, one slot
    per optimizer step, until the log step reads it (the loop's one sync with the device)."""

    loss_sums: torch.Tensor  # [steps]: this rank's sample-weighted loss sum of each step
    steps: int = 0
    samples: int = 0  # real samples over all ranks
    # of those, the ones a resumed run restored from its checkpoint: in the loss, not in the timings
    restored_steps: int = 0
    restored_samples: int = 0
    data_wait_s: float = 0.0
    started_at: float = field(default_factory=time.perf_counter)
    grad_norm: torch.Tensor | None = None  # of the last step, when it was measured
    profiled: bool = False  # the profiler ran during this window: its step times are inflated
    # a token-weighted run's valid labels of each step since the last log row, over all ranks (on
    # the device until the log step reads them, with the loss)
    label_counts: list[torch.Tensor] = field(default_factory=list)
    token_tallies: list[torch.Tensor] = field(default_factory=list)  # [real tokens, positions] per step, likewise

    def add_step(self, samples: int) -> None:
        self.steps += 1
        self.samples += samples

    def restore(self, loss_sums: torch.Tensor | None, steps: int, samples: int) -> None:
        """Continue a window saved in a checkpoint. `loss_sums` (over every rank already) is put on
        one rank only (None elsewhere), so that the log step's sum over ranks counts it once."""
        if loss_sums is not None:
            self.loss_sums[:steps] = loss_sums.to(self.loss_sums)
        self.steps = self.restored_steps = steps
        self.samples = self.restored_samples = samples

    def reset(self) -> None:
        self.loss_sums.zero_()
        self.steps = self.samples = self.restored_steps = self.restored_samples = 0
        self.data_wait_s = 0.0
        self.profiled = False
        self.label_counts.clear()
        self.token_tallies.clear()
        self.started_at = time.perf_counter()

    @classmethod
    def for_run(cls, every_n_steps: int, total_steps: int, device: torch.device) -> LogWindow:
        """A window never spans more than every_n_steps steps (a log row ends each)."""
        return cls(torch.zeros(min(every_n_steps, total_steps), device=device))


@dataclass
class Modules:
    """The model and what wraps it (built by launcher/train/setup.py and the strategy)."""

    model: nn.Module  # the user's model, unwrapped: eval and saving use it
    train_model: nn.Module  # activation checkpointing and DDP or FSDP around `model`: what the step calls
    loss_fn: LossFn | None  # None: the model computes its own
    # how the model is spread over the ranks (parallel/strategy.py): what the loop asks instead of the layout
    strategy: Strategy
    eval_model: nn.Module | None = None  # what evaluation calls, if not `model` (FSDP: the root's outputs)
    # the whole model's checkpointed tensors' shapes, by name (a pipeline rank's `model` holds some of them)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: list[nn.Parameter] = field(init=False)  # the model's parameters, listed once

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())  # once: no per-step Python work that grows with the model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.strategy.autocast()


@dataclass
class Optimization:
    """What steps the weights (launcher/train/optim.py)."""

    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    scaler: torch.amp.GradScaler | None  # fp16 only


@dataclass
class Data:
    """What the loop reads (launcher/data/builders.py): the plan, and each trained rank's loader."""

    plan: Plan
    # (rank, sampler, loader) for each rank this process trains: its own, or every simulated rank's
    shards: list[tuple[int, Positioned, DataLoader]]
    val_loader: DataLoader | None
    counting: Counting  # what the loss's mean is over: samples or tokens
    rank_rng: dict[int, dict[str, Any]] | None = None  # simulating ranks: each one's RNG streams, swapped in and out


@dataclass
class Observers:
    """What watches the run (launcher/observe/): metrics, profiler, heartbeat and the figures its rows need."""

    log: Metrics  # rank 0 writes, the others have no sinks
    profiler: StepProfiler | None = None  # when log.profile is on for this rank
    heartbeat: Heartbeat | None = None  # the main process: says it is alive when a step or an evaluation takes long
    tokens_per_sample: float | None = None  # for tokens/s
    flops_per_sample: float | None = None  # for MFU (forward + backward)
    # the plan's CPU estimate, shown once next to the measured step time (then None)
    step_time_estimate: StepTimeEstimate | None = None
    peak_flops: float | None = None  # per device, for MFU
    startup_logged: bool = False  # the first log row carries the start-up time, once


@dataclass
class Control:
    """Saving and stopping: the checkpointer and what it saves, the stop signals and the ranks' agreement."""

    checkpointer: Checkpointer
    saved: Mapping[str, Stateful | None]  # what a checkpoint holds, by name (resume.saved_objects)
    preempt: PreemptionFlag | None = None
    agreement: Agreement | None = None
    stop_signal: int | None = None  # the signal the ranks agreed to stop on (SIGINT, SIGTERM, ...): set by the loop


@dataclass
class Trainer:
    """What the loop works on, built complete by `launcher.train.assemble` from bundles that their
    subsystems build; no logic beyond the loop's own."""

    recipe: Recipe
    session: Session
    state: TrainState  # where the run is (restored from a checkpoint, or fresh)
    window: LogWindow  # what accumulates between two log rows
    modules: Modules
    optim: Optimization
    data: Data
    observe: Observers
    control: Control

    @property
    def device(self) -> torch.device:
        return self.session.device
