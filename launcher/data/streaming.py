"""Streamed (iterable) training data: a source read in order, dealt out to ranks and DataLoader
workers as DistributedSampler deals out a permutation, and resumable at any step, at any world size.

The source is any iterable of samples with no `__getitem__`: a torch IterableDataset, a streaming
`datasets.IterableDataset`, a generator over files. It is read from its start again each time it
ends (a pass; `set_epoch(pass)` first, when the source has it, so that a shuffling source reorders),
so the stream never runs out and every optimizer step is full: a streamed run needs `train.max_steps`.

Sample g of the stream (counting from the first pass's first) goes to rank g % W, as position
g // W of that rank's share; the rank's micro-batch j holds positions [j*b, (j+1)*b). An optimizer
step is G = b*A*W consecutive samples, so step k trains on samples [k*G, (k+1)*G), whatever W and A
are: the same rule as map-style data, hence the same maths on any number of ranks. Worker w (of nw)
of a rank yields the micro-batches j0 + w, j0 + w + nw, ...: the DataLoader takes one batch from
each worker in turn, so they arrive in order. Resuming at step k starts at micro-batch j0 = k*A;
each rank reads and drops the k*G samples before it. The position is the step alone, so nothing
per rank or per worker is saved, and a checkpoint resumes at another world size exactly.

The cost of that exactness: every rank (and every worker) reads the whole stream and keeps its
share, as `datasets.distributed.split_dataset_by_node` does when the shards do not divide evenly,
and a resume re-reads what came before. For sources that are cheap to read next to the step
(tokenized text, token files), that is small; decoding heavy samples belongs in the model's step
or in a map-style dataset.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset


def is_stream(dataset: Any) -> bool:
    """Read in order: a torch IterableDataset (whose inherited __getitem__ only raises), or any
    iterable that cannot be indexed."""
    if isinstance(dataset, IterableDataset):
        return True
    return hasattr(dataset, "__iter__") and not hasattr(dataset, "__getitem__")


class Stream(IterableDataset):
    """One rank's share of `source`, from micro-batch `start // micro_batch` on. Plays the sampler's
    part for the loop: `set_start` (positions in the rank's share) and `set_epoch` (a no-op: the
    loop's epoch is the whole run; the source's passes are counted here)."""

    def __init__(self, source: Iterable[Any], *, rank: int, world_size: int, micro_batch: int) -> None:
        self.source, self.rank, self.world_size, self.micro_batch = source, rank, world_size, micro_batch
        self.start = 0  # positions in this rank's share; a whole number of micro-batches

    def set_start(self, start: int) -> None:
        if start % self.micro_batch:
            raise ValueError(f"a stream resumes at a micro-batch boundary, not at position {start}")
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b, W, first = self.micro_batch, self.world_size, self.start // self.micro_batch
        g0 = self.start * W  # the first sample of micro-batch `first` of every rank
        for g, sample in enumerate(itertools.islice(passes(self.source), g0, None), g0):
            if g % W == self.rank and ((g // W) // b - first) % workers == worker:
                yield sample


def passes(source: Iterable[Any]) -> Iterator[Any]:
    """The source's samples, pass after pass, without end."""
    for epoch in itertools.count():
        set_epoch = getattr(source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        empty = True
        for sample in source:
            empty = False
            yield sample
        if empty:
            raise ValueError("the streamed dataset yielded no samples")
