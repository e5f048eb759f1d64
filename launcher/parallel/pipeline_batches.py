"""A window's micro-batches as one batch of one shape, for a pipeline schedule.

torch's pipeline stages infer the shapes they send and receive at the first step and keep their
buffers: every micro-batch of every step must have the same shape (measured on torch 2.14.1 with gloo:
a second step 12 tokens long after one of 8 aborts the receiving rank, "Received data size doesn't
match expected size"). So the launcher, under pipeline
parallelism, gives each step's schedule one batch of n_micro x rows sequences of `length` tokens, which
the schedule splits into its n_micro micro-batches along the first dimension:

- each micro-batch is padded to `rows` sequences (the recipe's batch size: DistributedSampler's dropped
  padding and a partial last batch leave fewer) and every sequence to `length` tokens (the run's longest
  sequence, fixed for the run), on the right: inputs with the pad id, labels with IGNORE_INDEX,
  attention masks with 0. Padding adds no valid token, so a token loss's mean and the micro-batch's
  weight k_i W / K do not change. Stages after the first see no attention mask (pipeline_split.py), so
  padding must be on the right, which is checked here.
- a window with fewer micro-batches than the schedule's (an epoch's partial last window) gets filler
  micro-batches of padding whose labels are 0 (a finite loss) and whose weight is exactly 0, as the
  launcher treats a micro-batch of no valid token (launcher/data/batches.py, without_ignored_labels).

A sample-counted loss cannot be padded with rows (its mean would count them): under pipeline
parallelism the loss must count tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from launcher.data.batches import IGNORE_INDEX, LABELS, SHIFTED_LABELS, is_mapping
from launcher.errors import RecipeError

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"


def stack_window(
    micro: Sequence[Any],
    weights: Sequence[float | torch.Tensor],
    n_micro: int,
    rows: int,
    length: int,
    pad_id: int = 0,
) -> tuple[Any, list[float | torch.Tensor]]:
    """(one batch of n_micro x rows sequences of `length`, the n_micro weights) from a window's
    micro-batches (tuples (inputs, labels) or mappings of (batch, sequence) tensors) and their weights."""
    if len(micro) != len(weights) or not 0 < len(micro) <= n_micro:
        raise ValueError(f"{len(micro)} micro-batches and {len(weights)} weights for a schedule of {n_micro}")
    padded = [_pad(b, rows, length, pad_id) for b in micro]
    filler = _filler(padded[0])
    padded += [filler] * (n_micro - len(micro))
    weights = [*weights, *[0.0] * (n_micro - len(micro))]
    if is_mapping(padded[0]):
        return {k: torch.cat([b[k] for b in padded]) for k in padded[0]}, weights
    return tuple(torch.cat([b[i] for b in padded]) for i in range(len(padded[0]))), weights


def schedule_inputs(batch: Any, n_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(what stage 0 is given, the target the last stage's loss is given): the labels with one more
    column, each row's micro-batch index, from which pipeline.WeightedLoss picks the weight."""
    if is_mapping(batch):
        inputs, labels = batch[INPUT_IDS], batch[SHIFTED_LABELS] if SHIFTED_LABELS in batch else batch[LABELS]
    else:
        inputs, labels = batch[0], batch[1]
    rows = labels.shape[0] // n_micro
    index = torch.arange(n_micro, device=labels.device).repeat_interleave(rows).to(labels.dtype)
    return inputs, torch.cat([labels, index[:, None]], dim=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a transformers causal LM computes from `labels` (position t predicts labels[t + 1]),
    for a recipe with no loss component: the last stage returns logits, not the model's output."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def aligned_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss for labels already aligned with the logits (`shift_labels`: a rank's part of a
    sequence under context parallelism, shifted over the whole sequence before the split)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _pad(batch: Any, rows: int, length: int, pad_id: int) -> Any:
    if is_mapping(batch):
        if POSITION_IDS in batch:  # the stages take token ids alone: each document's mask would be lost
            raise RecipeError(
                "dist.pipeline_parallel",
                "packed samples with document masks (position_ids) cannot go through pipeline stages yet, which "
                "would attend across the documents; set the dataset's pack_attention: cross, or pack: null, or "
                "dist.pipeline_parallel: 1",
            )
        mask = batch.get(ATTENTION_MASK)
        if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise RecipeError(
                "data.collate",
                "a batch is padded on the left; under pipeline parallelism the stages after the first see no "
                "attention mask, which is exact only for padding on the right (launcher.collate.PadToLongest's)",
            )
        return {k: _pad_tensor(v, rows, length, _fill(k, pad_id)) for k, v in batch.items()}
    inputs, labels, *rest = batch
    if rest:
        raise ValueError("a tuple batch under pipeline parallelism is (inputs, labels)")
    return _pad_tensor(inputs, rows, length, pad_id), _pad_tensor(labels, rows, length, IGNORE_INDEX)


def _fill(key: str, pad_id: int) -> int:
    return {INPUT_IDS: pad_id, LABELS: IGNORE_INDEX, SHIFTED_LABELS: IGNORE_INDEX}.get(key, 0)


def _pad_tensor(t: torch.Tensor, rows: int, length: int, value: int) -> torch.Tensor:
    if t.dim() != 2 or t.shape[0] > rows or t.shape[1] > length:
        raise ValueError(f"a micro-batch tensor of shape {tuple(t.shape)} does not fit ({rows}, {length})")
    return F.pad(t, (0, length - t.shape[1], 0, rows - t.shape[0]), value=value)


def _filler(batch: Any) -> Any:
    """A micro-batch of padding whose labels are a valid class: its loss is finite, its weight 0."""
    if is_mapping(batch):
        return {k: torch.zeros_like(v) for k, v in batch.items()}
    return tuple(torch.zeros_like(t) for t in batch)
