"""The batch arithmetic, checked against torch's real DistributedSampler: every optimizer step of any
world size and accumulation trains on the same global batch, and padding is never counted."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import recipe_dict
from launcher.data.loading import SeededDataset, ShardSampler
from launcher.data.plan import build_plan
from launcher.errors import RecipeError
from launcher.parallel.dims import ParallelDims
from launcher.recipe.schema import validate


def plan_for(n, b, W, A, drop_last=False, epochs=1):
    r = validate(
        recipe_dict(
            **{
                "data.batch_size": b,
                "data.drop_last": drop_last,
                "train.global_batch_size": b * A * W,
                "train.epochs": epochs,
            }
        )
    )
    return build_plan(r, ParallelDims(dp_replicate=W), n, None, "gloo", "cpu")


def windows(n, b, W, A, drop_last, epoch=0, seed=0):
    """Per optimizer step: the real samples each rank trains on, as DistributedSampler deals them."""
    plan = plan_for(n, b, W, A, drop_last)
    ds = list(range(n))
    shards = []
    for r in range(W):
        s = ShardSampler(ds, num_replicas=W, rank=r, shuffle=True, seed=seed, drop_last=drop_last, stop=plan.shard_stop)
        s.set_epoch(epoch)
        idx = list(s)
        micro = [idx[i : i + b] for i in range(0, len(idx), b)]
        assert len(micro) == plan.micro_batches_per_epoch
        shards.append(micro)
    steps = []
    for k in range(plan.steps_per_epoch):
        first = k * A
        real = []
        for r in range(W):
            for i in range(first, first + plan.window_micro_batches(k)):
                real += shards[r][i][: plan.real_in_micro_batch(i, r)]
        assert len(real) == plan.window_samples(k)
        steps.append(sorted(real))
    return steps


@pytest.mark.parametrize("n", [1, 7, 16, 37, 64, 101])
@pytest.mark.parametrize("b,W,A", [(4, 1, 1), (4, 2, 2), (2, 3, 1), (3, 2, 3), (1, 4, 2), (16, 1, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_step_trains_on_the_same_global_batch_at_any_world_size(n, b, W, A, drop_last):
    G = b * A * W
    if drop_last and n < G:
        with pytest.raises(RecipeError, match="data.drop_last"):
            plan_for(n, b, W, A, drop_last)
        return
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 + 3)).tolist()  # epoch 3, seed 0
    got = windows(n, b, W, A, drop_last, epoch=3)
    expected = [sorted(perm[k * G : (k + 1) * G]) for k in range(len(got))]
    assert got == expected
    covered = sum(len(w) for w in got)
    assert covered == (n // G * G if drop_last else n)  # every sample once; drop_last drops only the partial window


def test_shards_are_disjoint_cover_the_data_and_reshuffle_per_epoch():
    n, W = 50, 3
    orders = {}
    for epoch in (0, 1):
        shards = []
        for r in range(W):
            s = ShardSampler(list(range(n)), num_replicas=W, rank=r, shuffle=True, seed=7, drop_last=True)
            s.set_epoch(epoch)
            shards.append(list(s))
        flat = list(itertools.chain(*shards))
        assert len(flat) == len(set(flat)) == n // W * W  # disjoint
        orders[epoch] = flat
    assert orders[0] != orders[1]  # set_epoch changes the order
    s = ShardSampler(list(range(n)), num_replicas=W, rank=0, shuffle=True, seed=7, drop_last=True)
    s.set_epoch(1)
    assert list(s) == orders[1][: n // W]  # same seed and epoch, same order
    # without drop_last the shards cover all the data (with padding repeats)
    cover = set()
    for r in range(W):
        cover |= set(ShardSampler(list(range(n)), num_replicas=W, rank=r, shuffle=True, seed=7, drop_last=False))
    assert cover == set(range(n))


def test_sampler_start_skips_without_changing_the_order():
    s = ShardSampler(list(range(30)), num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=False)
    s.set_epoch(2)
    full = list(s)
    s.set_start(6)
    assert list(s) == full[6:] and len(s) == len(full) - 6


def test_seeded_dataset_makes_randomness_depend_on_sample_and_epoch_only():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(()) + i

    ds = SeededDataset(Noisy(), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds.__getitems__([(0, 1), (0, 2), (1, 1)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    b = [ds[(1, 1)], ds[(0, 2)], ds[(0, 1)]]  # other order, one at a time
    assert a[0] == b[2] and a[1] == b[1] and a[2] == b[0]
    assert a[0] != a[2]  # another epoch, another draw


def test_plan_counts_steps_and_partial_windows():
    p = plan_for(37, 4, 2, 2, epochs=2)
    assert (p.global_batch, p.accumulation, p.steps_per_epoch, p.total_steps) == (16, 2, 3, 6)
    assert [p.window_samples(k) for k in range(3)] == [16, 16, 5]
    assert [p.window_micro_batches(k) for k in range(3)] == [2, 2, 1]
    # shard of 19 per rank (38 with one padding sample on rank 1): micro-batch 4 holds 3 samples
    assert p.real_in_micro_batch(4, 0) == 3 and p.real_in_micro_batch(4, 1) == 2
