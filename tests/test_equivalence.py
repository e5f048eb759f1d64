"""N ranks x accumulation == one process with the same global batch: same weights, same losses.

37 training samples, micro-batch 4, global batch 16: each epoch has two full windows and a partial
one of 5 samples, and DistributedSampler pads rank 1's shard. Shuffling is on; 2 epochs."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import assert_close_rel, launcher, load_weights, recipe_dict, worker_env, write_recipe
from launcher.cluster.env import ClusterEnv
from launcher.recipe.schema import validate
from launcher.train import assemble


def rows(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def single(tmp_path, name, **changes):
    run_dir = tmp_path / name
    recipe = validate(recipe_dict(**{"run.dir": str(run_dir), **changes}))
    state = assemble.run(recipe, ClusterEnv())
    assert state.step == 6
    return run_dir


def multi(tmp_path, name, use_torchrun=False, **changes):
    run_dir = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", recipe_dict(**{"run.dir": str(run_dir), **changes}))
    if use_torchrun:
        import subprocess

        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "launcher",
            "run",
            str(path),
        ]
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    else:
        proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 rank x micro 16: the plain big-batch run everything is compared with."""
    tmp = tmp_path_factory.mktemp("ref")
    return single(tmp, "big", **{"data.batch_size": 16})


def assert_same_run(run_dir, reference):
    assert_close_rel(load_weights(run_dir), load_weights(reference), rtol=1e-6)
    for key in ("loss", "val_loss"):
        got, want = rows(run_dir, key), rows(reference, key)
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, rel=1e-6), key


def test_one_rank_with_accumulation_equals_big_batch(tmp_path, reference):
    assert_same_run(single(tmp_path, "acc4"), reference)  # micro 4 x accumulation 4


def test_two_ranks_with_accumulation_equal_big_batch(tmp_path, reference):
    assert_same_run(multi(tmp_path, "w2acc2"), reference)  # 2 ranks x micro 4 x accumulation 2


def test_two_ranks_under_torchrun_with_checkpoint_sequential_equal_big_batch(tmp_path, reference):
    run_dir = multi(tmp_path, "ckpt", use_torchrun=True, **{"train.activation_checkpointing.segments": 2})
    assert_same_run(run_dir, reference)


def test_the_weights_do_change(reference, tmp_path):
    # guard against a vacuous pass: a different seed gives different weights
    other = single(tmp_path, "other", **{"data.batch_size": 16, "seed": 1})
    with pytest.raises(AssertionError):
        assert_close_rel(load_weights(other), load_weights(reference), rtol=1e-6)
