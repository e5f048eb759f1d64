"""The training loop's state, typed: where the run is (TrainState, saved in checkpoints) and what
accumulates between two log rows (LogWindow)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


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
        self.started_at = time.perf_counter()

    @classmethod
    def for_run(cls, every_n_steps: int, total_steps: int, device: torch.device) -> LogWindow:
        """A window never spans more than every_n_steps steps (a log row ends each)."""
        return cls(torch.zeros(min(every_n_steps, total_steps), device=device))
