"""Streamed (iterable) training data (issue #14): dealt to ranks and workers with no duplicates and
no gaps, in the order map-style data has; the same maths on any number of ranks; exact resume after
a SIGKILL; one-line errors. Real DataLoader workers, real processes, gloo."""

from __future__ import annotations

import os
import signal

import pytest
from torch.utils.data import DataLoader

from conftest import assert_close_rel, finish, launcher, load_weights, recipe_dict, write_recipe
from launcher.data.streaming import Stream
from runs import assert_identical, gate, start, wait_for
from testkit import NumberedStream

STREAMED = {
    "data.train": {"_component_": "testkit.StreamedRegression", "size": 37},
    "train.epochs": None,
    "train.max_steps": 6,  # 96 samples: the 37-sample stream's 3rd pass ends inside step 6
}


def ids(batch) -> list[int]:
    return batch[1].tolist()


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_each_sample_of_a_pass_goes_to_one_rank_once_in_map_style_order(world, workers):
    """24 samples, micro-batch 2: rank r's micro-batch j holds samples (j*2 + k)*W + r, k = 0, 1,
    as DistributedSampler's round-robin would; with DataLoader workers (real processes) too."""
    size, b = 24, 2
    seen = []
    for rank in range(world):
        stream = Stream(NumberedStream(size), rank=rank, world_size=world, micro_batch=b)
        batches = iter(DataLoader(stream, batch_size=b, num_workers=workers))
        for j in range(size // (b * world)):
            got = ids(next(batches))
            assert got == [(j * b + k) * world + rank for k in range(b)], (rank, j)
            seen += got
    assert sorted(seen) == list(range(size))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_at_a_micro_batch_continues_where_it_stopped(workers):
    """set_start(6) on rank 1 of 2: micro-batch 3 first, then on into the next pass."""
    stream = Stream(NumberedStream(24), rank=1, world_size=2, micro_batch=2)
    stream.set_start(6)
    batches = iter(DataLoader(stream, batch_size=2, num_workers=workers))
    got = [ids(next(batches)) for _ in range(5)]
    assert got == [[13, 15], [17, 19], [21, 23], [1, 3], [5, 7]]


def run(tmp_path, name, nproc=None, **changes):
    path = write_recipe(
        tmp_path / f"{name}.yaml", recipe_dict(**{**STREAMED, "run.dir": str(tmp_path / name), **changes})
    )
    proc = launcher("run", *(["--nproc", str(nproc)] if nproc else []), path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("stream"), "big", **{"data.batch_size": 16})


def test_streamed_training_on_2_ranks_with_accumulation_and_workers_equals_one_process(tmp_path, one_process):
    w2 = run(tmp_path, "w2", nproc=2, **{"data.num_workers": 2})
    assert_close_rel(load_weights(w2), load_weights(one_process), rtol=1e-6)
    w1 = run(tmp_path, "w1", **{"data.num_workers": 0})
    assert_close_rel(load_weights(w1), load_weights(one_process), rtol=1e-6)


def test_a_stream_extended_by_max_steps_on_other_ranks_continues_where_it_stopped(tmp_path, one_process):
    """3 steps in one process, then the same run directory with max_steps 6 on 2 ranks: the stream
    reads on from sample 48 (it once restarted from 0: the run's end was its epoch's end)."""
    run(tmp_path, "longer", **{"data.batch_size": 16, "train.max_steps": 3, "checkpoint.every_n_steps": 3})
    longer = run(tmp_path, "longer", nproc=2, **{"data.num_workers": 2})
    assert_close_rel(load_weights(longer), load_weights(one_process), rtol=1e-5)


def test_a_sigkill_mid_stream_and_an_elastic_restart_end_bit_identical(tmp_path):
    model = {"_component_": "testkit.GatedMLP", "sizes": [8, 16, 16, 1], "dropout": 0.1}
    reference = run(tmp_path, "ref", nproc=2, model=model)
    _, waiting, gated = gate(tmp_path, rank=1, at_call=9, first_attempt_only=True)
    changes = {**STREAMED, "model": {**gated["model"], "sizes": [8, 16, 16, 1], "dropout": 0.1}}
    changes |= {"checkpoint.every_n_steps": 2, "data.num_workers": 2, "run.dir": str(tmp_path / "run")}
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**changes))
    proc = start("run", "--nproc", "2", "--max-restarts", "1", path)
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)  # rank 1 dies in step 5 (micro-batch 9), mid-pass
    out, err = finish(proc, 300)
    assert proc.returncode == 0, err
    assert "restart 1" in out
    assert_identical(load_weights(tmp_path / "run"), load_weights(reference))


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"train.max_steps": None, "train.epochs": 2}, "train.max_steps: a streamed dataset has no length"),
        ({"data.val": {"_component_": "testkit.StreamedRegression"}}, "data.val: evaluation needs a map-style dataset"),
    ],
)
def test_stream_mistakes_are_one_line(tmp_path, changes, expected):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{**STREAMED, "run.dir": str(tmp_path / "run"), **changes}))
    proc = launcher("run", path)
    assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_2_rank_run_trains_on_every_sample_of_a_pass_exactly_once(tmp_path):
    """32 numbered samples, global batch 16 (2 ranks x 4 x accumulation 2), 2 steps: one pass, and
    the samples each rank's model saw are disjoint and together all of them."""
    record = tmp_path / "seen"
    run(
        tmp_path,
        "once",
        nproc=2,
        model={"_component_": "testkit.RecordingMLP", "sizes": [1, 4, 1], "record": str(record)},
        **{
            "data.train": {"_component_": "testkit.NumberedStream", "size": 32, "regression": True},
            "data.val": None,
            "data.num_workers": 2,
            "train.max_steps": 2,
        },
    )
    seen = {r: [int(v) for v in (tmp_path / f"seen.rank{r}").read_text().split()] for r in (0, 1)}
    assert sorted(seen[0] + seen[1]) == list(range(32))
    assert all(v % 2 == 0 for v in seen[0]) and all(v % 2 == 1 for v in seen[1])  # dealt round-robin
