"""Sharded evaluation: loss (and accuracy, for class targets) over every validation sample once."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from launcher.cluster import distributed
from launcher.data import batches
from launcher.data.batches import Counting, LossFn
from launcher.data.loading import ShardSampler, batch_size_of, slice_batch, to_device, workers_stopped_on_error


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn | None,
    counting: Counting,
    val_samples: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    max_batches: int | None,
    should_stop: Callable[[], bool],
    every_rank_forwards: bool = False,
    sum_over_data: Callable[[torch.Tensor], torch.Tensor] = distributed.all_reduce,
    local_batch: Callable[[Any], Any] | None = None,
    counts_samples: bool = True,
) -> dict[str, float] | None:
    """Sharded evaluation over `loader` (a ShardSampler's shard of `val_samples` samples);
    DistributedSampler's padding is dropped so each sample counts once. `val_loss` is the mean
    over samples, or over valid tokens (`counting`), as training's is. `should_stop` is asked
    between batches (every rank at the same batch): a stop signal (preemption, Ctrl-C) then does
    not wait for a long evaluation to end, and None is returned. `every_rank_forwards`: a rank whose
    batch is all padding still runs the model (on one sample, not counted), as FSDP's gathers need.
    `local_batch`: the part of a batch this rank computes (the strategy's: its chunks of each
    sequence under context parallelism), and `counts_samples`: whether this rank counts the samples
    (one rank of a group that reads the same samples does)."""
    sampler = loader.sampler
    assert isinstance(sampler, ShardSampler)
    real_end = math.ceil((val_samples - sampler.rank) / sampler.num_replicas)  # real shard positions
    was_training = model.training
    model.eval()
    # loss x its count, samples, correct predictions, predictions, the loss's count (samples or tokens)
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    position = 0
    stream = iter(loader)
    with workers_stopped_on_error([stream]):
        for index, batch in enumerate(stream):
            if max_batches is not None and index >= max_batches:
                break  # every rank stops at the same batch: its shard has as many batches as the others'
            if should_stop():
                model.train(was_training)
                return None
            n = batch_size_of(batch)
            n_real = max(0, min(position + n, real_end) - position)
            position += n
            if n_real == 0 and not every_rank_forwards:
                continue
            batch = slice_batch(batch, max(n_real, 1))
            if local_batch is not None:
                batch = local_batch(batch)
            count = batches.valid_tokens(batch, counting.shift) if counting.tokens else n_real
            features, targets = batches.features_and_targets(to_device(batch, device), loss_fn is None)
            with autocast():
                out = batches.call(model, features)
                loss = batches.loss_of(out, targets, loss_fn)
            if n_real == 0:
                continue
            totals[1] += n_real if counts_samples else 0
            if count == 0:
                continue  # a mean over no token: NaN, which must not reach val_loss
            totals[0] += loss.double() * count
            totals[4] += count
            logits = batches.logits_of(out)
            if (
                loss_fn is not None
                and isinstance(logits, torch.Tensor)
                and not targets.is_floating_point()
                and logits.shape[:-1] == targets.shape
            ):
                valid = targets != batches.IGNORE_INDEX
                totals[2] += ((logits.argmax(-1) == targets) & valid).sum()
                totals[3] += valid.sum()
    model.train(was_training)
    sum_over_data(totals)  # the strategy's: over the ranks that read different data, each once
    loss_sum, count, correct, predictions, weight = totals.tolist()
    metrics = {"val_loss": loss_sum / max(weight, 1), "val_samples": int(count)}
    if predictions:
        metrics["val_accuracy"] = correct / predictions
    return metrics
