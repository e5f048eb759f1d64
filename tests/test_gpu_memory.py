"""`launcher check --gpu-memory GIB`: does each rank fit, and if not, which change would (issue #35, item 3)."""

from __future__ import annotations

import re

import torch

from conftest import ROOT, TINY_GPT_SHAPE, launcher

GPT = [ROOT / "recipes" / "gpt.yaml", *TINY_GPT_SHAPE, "data.batch_size=8", "--nproc", "2"]


def test_activations_are_the_bytes_autograd_saves_counted_on_the_meta_device():
    """An MLP 8-16-1 with MSE on a batch of 4, counted by hand: the first Linear saves its input
    (4x8), ReLU its output (4x16, which the second Linear saves too: once), the loss its input and
    target (4x1 each); the weights are state, not activations. fp32: 4 bytes each."""
    from launcher.models import MLP
    from launcher.parallel import budget

    with torch.device("meta"):
        model = MLP([8, 16, 1])
    batch = (torch.empty(4, 8, device="meta"), torch.empty(4, 1, device="meta"))
    assert budget.activation_bytes(model, torch.nn.MSELoss(), batch, 0, 0, half=False) == (32 + 64 + 4 + 4) * 4
    assert budget.activation_bytes(model, torch.nn.MSELoss(), batch, 0, 0, half=True) == (32 + 64 + 4 + 4) * 2


def total_gib(line: str) -> float:
    return float(re.search(r"fits?: ([\d.]+) GiB", line).group(1))


def test_gpu_memory_says_it_fits_or_names_the_change_that_fits_against_its_own_numbers():
    """The line's total is the plan's state per rank plus the measured activations plus the headroom;
    just under it the recipe does not fit (exit 2) and the change it names fits the same limit."""
    fits = launcher("check", *GPT, "--gpu-memory", "80")
    assert fits.returncode == 0, fits.stderr
    line = next(v for v in fits.stdout.splitlines() if v.startswith("fits 80 GiB"))
    state = float(re.search(r"\(([\d.e-]+) GiB state", line).group(1))
    acts = float(re.search(r"activations ([\d.e-]+) GiB", line).group(1))
    assert line.split(None, 3)[3].startswith("fits: ") and abs(total_gib(line) - (state + acts + 1)) < 2e-3 * total_gib(
        line
    )
    ddp = next(v for v in fits.stdout.splitlines() if v.startswith("per rank, ddp"))
    assert ddp.split()[3:5] == [f"{state * 1024:.3g}", "MiB"] or ddp.split()[3:5] == [f"{state * 2**20:.3g}", "KiB"], (
        ddp,
        line,
    )

    limit = f"{1 + state + acts * 0.9:.6f}"  # just under the need
    tight = launcher("check", *GPT, "--gpu-memory", limit)
    assert tight.returncode == 2, tight.stderr
    line = next(v for v in tight.stdout.splitlines() if v.startswith(f"fits {float(limit):g} GiB"))
    change = re.search(r"; (\S+) fits \(([\d.]+) GiB", line)
    assert "does not fit" in line and change is not None, line
    assert float(change.group(2)) <= float(limit)
    assert change.group(1).split("=")[0] in (
        "dist.strategy",  # the state sharded over the 2 ranks
        "dist.tensor_parallel",
        "train.activation_checkpointing.segments",
        "data.batch_size",  # the same global batch by accumulation: the same maths
    )
