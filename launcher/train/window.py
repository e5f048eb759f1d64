"""One optimizer step's micro-batches, on every rank this process trains, with their loss weights.

A micro-batch's loss is a mean over its samples or its valid tokens (launcher/data/batches.py). Weighting
it by its share of the window's count, times the W ranks DDP or FSDP averages over, makes the step's
gradient that of the mean over the whole window, whatever W and the accumulation are. Samples are
known from the plan; tokens are counted in the window's labels, fetched ahead for that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from launcher.data import batches
from launcher.data.loading import Batch, batch_size_of, slice_batch
from launcher.train.loop_state import Trainer

# one micro-batch of one rank: (index in the window, rank, batch, loss weight, its weight in the log)
Micro = tuple[int, int, Batch, "float | torch.Tensor", "float | torch.Tensor"]


def micro_batches(
    t: Trainer, streams: list[tuple[int, Iterator[Batch]]], n_micro: int, micro_index: int, n_window: int
) -> Iterator[Micro]:
    """The window's micro-batches in training order: index m, then rank."""
    if not t.data.counting.tokens:
        return sample_weighted(t, streams, n_micro, micro_index, n_window)
    fetched = [(rank, [_next(t, stream) for _ in range(n_micro)]) for rank, stream in streams]
    return token_weighted(t, fetched, micro_index, n_window)


def _next(t: Trainer, stream: Iterator[Batch]) -> Batch:
    t0 = time.perf_counter()
    batch = next(stream)
    t.window.data_wait_s += time.perf_counter() - t0
    return batch


def _real(batch: Batch, n_real: int) -> Batch:
    """Drop DistributedSampler's padding, keeping one sample when nothing is real so that this
    rank still joins the window's gradient reduction (with zero weight)."""
    return slice_batch(batch, max(n_real, 1)) if n_real < batch_size_of(batch) else batch


def sample_weighted(
    t: Trainer, streams: list[tuple[int, Iterator[Batch]]], n_micro: int, micro_index: int, n_window: int
) -> Iterator[Micro]:
    """Micro-batch i holds n_i real samples of the window's n_window: its mean loss x n_i * W / n_window."""
    p, world = t.data.plan, t.modules.strategy.gradient_mean_over
    for m in range(n_micro):
        for rank, stream in streams:
            n_real = p.real_in_micro_batch(micro_index + m, rank)
            batch = t.modules.strategy.local_batch(_real(_next(t, stream), n_real), t.data.counting.shift)
            yield m, rank, batch, n_real * world / n_window, n_real


def token_weighted(
    t: Trainer, fetched: list[tuple[int, list[Batch]]], micro_index: int, n_window: int
) -> Iterator[Micro]:
    """Micro-batch i holds k_i valid tokens of the window's K (all ranks): its mean loss x k_i * W / K.
    K is counted on the CPU from the labels and summed over ranks in one all-reduce on the device,
    which the host never waits for. In the log, the window's token mean counts for its samples."""
    p, world = t.data.plan, t.modules.strategy.gradient_mean_over
    real: list[list[tuple[int, Batch, int]]] = []  # per rank: (rank, batch without padding, valid tokens)
    tally = [0, 0]  # real tokens and token positions (padding included) of the mapping batches with a mask
    for rank, window in fetched:
        per_rank = []
        for m, batch in enumerate(window):
            n_real = p.real_in_micro_batch(micro_index + m, rank)
            # this rank's part (its chunks of each sequence under context parallelism), whose tokens it counts
            batch = t.modules.strategy.local_batch(_real(batch, n_real), t.data.counting.shift)
            tokens = batches.valid_tokens(batch, t.data.counting.shift) if n_real else 0
            if tokens == 0:
                # its mean loss would be 0/0 = NaN, and NaN x a weight of 0 is still NaN: give the
                # forward finite labels to compute (the same operators, so the same collectives)
                # and weight it by exactly 0, which adds exactly 0 to the gradients and the log
                batch = batches.without_ignored_labels(batch, t.data.counting.shift)
            per_rank.append((rank, batch, tokens))
            counted = batches.real_tokens(batch) if n_real else None
            if counted is not None:
                tally = [tally[0] + counted[0], tally[1] + counted[1]]
        real.append(per_rank)
    total = torch.tensor([sum(k for per_rank in real for _, _, k in per_rank), *tally], dtype=torch.int64)
    if t.device.type == "cuda":
        total = total.pin_memory().to(t.device, non_blocking=True)
    t.modules.strategy.sum_over_data(total)  # over the ranks that read different tokens, each token once
    total, tallied = total[:1], total[1:]
    t.window.label_counts.append(total)  # read at the log step: a window of no labels is reported there
    t.window.token_tallies.append(tallied)
    # a window of only padding labels: every weight is 0, so zero gradients, not NaN
    total_f = total.clamp(min=1).to(torch.float32).reshape(())
    for m in range(len(fetched[0][1])):
        for per_rank in real:
            rank, batch, tokens = per_rank[m]
            weight = tokens * world / total_f
            yield m, rank, batch, weight, weight * (n_window / world)


def padding_metrics(token_tallies: list[torch.Tensor], elapsed_s: float) -> dict[str, float]:
    """`padding` (the fraction of token positions that are padding) and `real_tokens_per_s` (tokens
    that are not, per second, over all ranks) of a log row's windows, where the batches say (a mask)."""
    counts = torch.stack(token_tallies).sum(0).tolist() if token_tallies else [0, 0]
    real, positions = counts
    if not positions:
        return {}
    return {"padding": 1 - real / positions, "real_tokens_per_s": real / elapsed_s}
