"""The launcher's training step against the same step written by hand, operator by operator.

Both run under torch.profiler (the launcher's `log.profile`); every aten operator of the recorded
steps is counted. The launcher may add only the one in-place add that keeps the step's loss on the
device for the next log step: no `.item()` or other host-device sync, no per-parameter Python
work, nothing that grows with the model. And its peak memory over those steps is no higher: no
tensor is kept longer than by hand. Timing-free: counts, not seconds (speed is in bench/).
This pins an implementation detail on purpose: a change that adds an operator to the step fails
here, and must say why it is worth it.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import SUPPORT, launcher, worker_env, write_recipe
from launcher.observe.profiling import read_trace

STEPS = 4  # recorded steps, after 3 steps and the profiler's warm-up step
# what one launcher step adds: window.loss_sums[i].add_(loss.detach(), alpha=n) (select, detach, add_)
EXTRA_PER_STEP = Counter({"aten::select": 1, "aten::as_strided": 1, "aten::detach": 1, "aten::add_": 1})
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}


def trace(path: Path) -> dict:
    t = read_trace(path)
    assert t["steps"] == STEPS
    return t


@pytest.mark.parametrize("precision,clip", [("fp32", None), ("bf16", 1.0)])
def test_the_launcher_step_runs_the_hand_written_operators_plus_one_add(tmp_path, precision, clip):
    recipe = {
        "name": "step-path",
        "seed": 0,
        "run": {"dir": str(tmp_path / "run")},
        "model": {"_component_": "launcher.models.MLP", "sizes": [8, 32, 32, 1]},
        "data": {
            "train": {"_component_": "launcher.datasets.synthetic.Regression", "size": 512, "in_dim": 8},
            "batch_size": 8,
        },
        "loss": {"_component_": "torch.nn.MSELoss"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 0.01},
        # one epoch of 64 steps; no log step (the one place that syncs) among the recorded ones
        "train": {"epochs": 1, "precision": precision, "grad_clip_norm": clip},
        "log": {"every_n_steps": 100, "profile": {"start_step": 3, "steps": STEPS, "memory": True}},
    }
    launcher("run", write_recipe(tmp_path / "r.yaml", recipe), check=True)
    subprocess.run(
        [
            sys.executable,
            str(SUPPORT / "hand_written_step.py"),
            str(tmp_path / "hand"),
            precision,
            str(clip) if clip is not None else "none",
        ],
        env=worker_env(),
        check=True,
        timeout=300,
    )
    ours, theirs = (
        trace(tmp_path / "run" / "profile" / "rank0.trace.json"),
        trace(tmp_path / "hand" / "hand.trace.json"),
    )
    # no tensor outlives its use longer than by hand (counted from the profiler's start, on CPU)
    assert ours["peak_bytes"]["cpu"] <= theirs["peak_bytes"]["cpu"], (ours["peak_bytes"], theirs["peak_bytes"])
    ours, theirs = ours["ops"], theirs["ops"]
    assert theirs - ours == Counter()  # nothing the hand-written step does is done differently
    extra = ours - theirs
    # (the optimizer's own .item() on its CPU step counters is in both)
    assert not SYNCS & extra.keys(), f"the launcher's step syncs with the device: {dict(extra)}"
    allowed = Counter({k: v * STEPS for k, v in EXTRA_PER_STEP.items()})
    assert extra - allowed == Counter(), f"the launcher's step adds {dict(extra - allowed)} over {STEPS} steps"
    assert extra["aten::add_"] == STEPS  # the loss is accumulated, once per step
