"""Datasets -> DistributedSampler -> DataLoader.

`ShardSampler` is torch's DistributedSampler (same permutation, same round-robin shards, same
padding) with two additions: it can start at an offset inside its shard, which is how a resumed
run skips the samples it already trained on without loading them, and it can stop early, which is
how `drop_last` drops whole partial windows rather than micro-batches.

Training samples are fetched through `SeededDataset`, which seeds torch's and Python's RNG from
(seed, epoch, index) for each sample: a random augmentation then depends only on the sample and the
epoch, not on the worker that loads it, the number of workers or ranks, or a restart in between.
A dataset whose class sets `deterministic = True` (no randomness in __getitem__, like the built-in
ones) is fetched directly, without that per-sample cost.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

# a collated batch: a tensor, or a tuple, list or dict of them (nested)
Batch = Any


class Positioned(Protocol):
    """What the loop tells a rank's sampler (ShardSampler) or stream (streaming.Stream) per epoch."""

    def set_epoch(self, epoch: int) -> None: ...

    def set_start(self, start: int) -> None: ...


class ShardSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        stop: int | None = None,
        with_epoch: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0
        self.stop = self.num_samples if stop is None else min(stop, self.num_samples)
        self.with_epoch = with_epoch

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's shard in the current epoch (resume)."""
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        indices = itertools.islice(super().__iter__(), self.start, self.stop)
        if self.with_epoch:
            return ((self.epoch, i) for i in indices)
        return indices

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class SeededDataset(Dataset):
    """Fetches `dataset[i]` for keys `(epoch, i)` with RNG seeded from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.deterministic = bool(getattr(dataset, "deterministic", False))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style datasets have a length

    def _fetch(self, epoch: int, index: int) -> Any:
        s = hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF
        torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would reseed CUDA too
        random.seed(s)
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        if self.deterministic:
            return [self.dataset[index] for _, index in keys]
        # fork_rng keeps the caller's RNG streams (dropout in the main process) untouched
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                return [self._fetch(epoch, index) for epoch, index in keys]
            finally:
                random.setstate(state)


def _init_worker(worker_id: int, ignore_signals: tuple[int, ...] = ()) -> None:  # noqa: ARG001 - torch's signature
    # A preemption signal sent to the whole process group (SLURM signals every process of a step)
    # must not kill a worker before the main process has checkpointed: the main process acts on it,
    # and stops its workers through the loader; they also exit on their own when it is gone.
    import signal

    for s in ignore_signals:
        signal.signal(s, signal.SIG_IGN)
    # numpy is not seeded by torch: give each worker its own stream, derived from torch's seed
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(
    dataset: Dataset,
    sampler: ShardSampler | None,
    batch_size: int,
    *,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int | None,
    seed: int,
    ignore_signals: tuple[int, ...] = (),
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """`sampler` None: `dataset` is a streaming.Stream, whose workers must start afresh for each
    iterator (they read from the position the loop set), so they are not kept between iterators."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra.update(
            persistent_workers=sampler is not None,
            prefetch_factor=prefetch_factor or 2,
            worker_init_fn=functools.partial(_init_worker, ignore_signals=ignore_signals),
        )
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=g,
        collate_fn=collate_fn,
        **extra,
    )


@contextmanager
def workers_stopped_on_error(streams: Iterable[Iterator[Batch]]) -> Iterator[None]:
    """On an exception, stop the worker processes behind `streams` (DataLoader iterators) before it
    propagates: the iterators would live on in the traceback, and their workers, which ignore the
    preemption signals, would hold the process's exit forever (multiprocessing joins them after a
    SIGTERM they ignore). A normal end keeps persistent workers for the next epoch."""
    try:
        yield
    except BaseException:
        for stream in streams:
            shutdown = getattr(stream, "_shutdown_workers", None)  # torch's multi-process iterator
            if callable(shutdown):
                shutdown()
        raise


def batch_size_of(batch: Batch) -> int:
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)


def slice_batch(batch: Batch, n: int) -> Batch:
    """The first `n` samples of a collated batch (tensors in a tuple/list/dict, or a tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):  # a dict, or a transformers BatchEncoding
        return {k: slice_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, n) for v in batch)
    return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
