"""The loss component must return the mean over its micro-batch (its samples, or its valid tokens):
the window weights each micro-batch's loss by its share of the step's samples or tokens
(launcher/train/window.py), which is exact only for a mean. A sum grows with the micro-batch, so
the same recipe trains differently on 2 ranks than on 1 (4.5% apart after a few steps), with no
error anywhere; a loss per element (`reduction: none`) is not one number to step on.

torch's losses say how they reduce (`reduction`); a loss of one's own is probed at `launcher check`
on a real sample: a mean over the batch gives the same loss for that sample twice over, a sum twice
the loss. Per-sample and per-token means (a sum over each sample's tokens, then the mean over the
samples; or cross-entropy over the valid tokens) give the same loss both times, and pass."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from launcher.data import batches
from launcher.data.loading import to_device
from launcher.errors import RecipeError

# KLDivLoss's "batchmean" is the sum over each sample, then the mean over the samples: a mean
MEANS = ("mean", "batchmean")
# outputs (e.g. logits) of at most this many values are probed: beyond, a random copy costs memory
PROBE_MAX_VALUES = 2**24


def check_reduction(loss_fn: Any) -> None:
    """RecipeError for a loss whose `reduction` (torch's losses have one) is not a mean."""
    reduction = getattr(loss_fn, "reduction", None)
    if not isinstance(reduction, str) or reduction in MEANS:
        return
    if reduction == "none":
        what = "gives a loss per element, not one number to step on"
    else:
        what = (
            "is not a mean: the launcher weights each micro-batch's loss as the mean over its samples or tokens, and "
            f"a {reduction} grows with the micro-batch, so the results would change with the number of ranks and "
            "the accumulation"
        )
    raise RecipeError("loss.reduction", f"{reduction!r} {what}; set loss.reduction=mean")


def probe(loss_fn: Any, model: nn.Module, dataset: Any, collate: Any, component: str) -> None:
    """RecipeError if `loss_fn` returns more than one number, or a sum over the batch: its loss of
    the dataset's first sample twice over is twice its loss of that sample once. Computed on random outputs of the shape
    the model gives (a meta-device forward: no weights, no compute), against the sample's real
    targets. Anything the probe cannot do (a model that cannot run on the meta device, outputs that
    are not one tensor, a loss that raises on random outputs) leaves the run to tell."""
    if not any(p.is_meta for p in model.parameters()):
        return  # built on the CPU: a forward would cost real compute
    try:
        losses = _losses_of_copies(loss_fn, model, dataset[0], collate)
    except Exception:  # noqa: BLE001  # the probe is a courtesy: the run reports what it cannot do
        return
    if losses is None:
        return
    once, twice = losses
    if once.numel() != 1 or twice.numel() != 1:
        raise RecipeError(
            "loss",
            f"{component} returns {twice.numel()} numbers (shape {tuple(twice.shape)}) for a batch of 2, not one: "
            "return the mean over the batch's samples or tokens",
        )
    a, b = float(once), float(twice)
    if math.isfinite(a) and abs(a) > 1e-6 and math.isclose(b, 2 * a, rel_tol=1e-3):
        raise RecipeError(
            "loss",
            f"{component} returns a sum over the batch, not a mean (a sample gives {a:.4g}, the same sample twice "
            f"{b:.4g}): the launcher weights each micro-batch's loss as the mean over its samples or tokens, so the "
            "results would change with the number of ranks and the accumulation; return the mean",
        )


def _losses_of_copies(
    loss_fn: Any, model: nn.Module, sample: Any, collate: Any
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The loss of a batch of `sample`, and of a batch of it twice, on the same random outputs."""
    shapes, targets = [], []
    for n in (1, 2):
        batch = (collate or default_collate)([sample] * n)
        features, target = batches.features_and_targets(batch, model_computes_loss=False)
        with torch.no_grad():
            outputs = batches.logits_of(batches.call(model, to_device(features, torch.device("meta"))))
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            return None
        shapes.append(outputs.shape)
        targets.append(target)
    one, two = shapes
    if one.numel() > PROBE_MAX_VALUES or two != (2 * one[0], *one[1:]):  # not batch-first: nothing to compare
        return None
    outputs = torch.randn(one, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        once, twice = loss_fn(outputs, targets[0]), loss_fn(torch.cat([outputs, outputs]), targets[1])
    return torch.as_tensor(once), torch.as_tensor(twice)
