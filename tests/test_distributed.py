"""Real multi-process runs on gloo: communication counts, failures, interrupts and teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import finish, launcher, recipe_dict, worker_env, write_recipe
from runs import processes_with


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradients_are_all_reduced_only_on_the_last_micro_step(tmp_path, accumulation):
    counts = tmp_path / "counts"
    counts.mkdir()
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "data.val": None,
            "train.epochs": 1,
            "train.global_batch_size": 4 * 2 * accumulation,
            "dist.ddp.comm_hook": {"_component_": "testkit.counting_allreduce_hook"},
        }
    )
    proc = launcher("run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", r), env=worker_env(COUNT_DIR=counts))
    assert proc.returncode == 0, proc.stderr
    steps = -(-37 // (8 * accumulation))  # optimizer steps in one epoch
    for rank in (0, 1):
        synced = len((counts / f"rank{rank}.txt").read_text().split())
        assert synced == steps, f"rank {rank}: {synced} synchronised backward passes for {steps} optimizer steps"


def test_a_rank_that_raises_stops_every_rank_with_one_error_line(tmp_path):
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "train.epochs": 50,
            "model": {"_component_": "testkit.FailOnRank", "rank": 1, "at_call": 3},
        }
    )
    proc = launcher(
        "run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", r), env=worker_env(**{marker: "1"}), timeout=120
    )
    assert proc.returncode == 1
    summary = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert summary == ["error: rank 1 failed (exit code 1): ValueError: injected failure on rank 1"], proc.stderr
    assert proc.stderr.count("Traceback") == 1  # the failing rank's, once; the other rank stops quietly
    assert processes_with(marker) == []


def test_the_failing_rank_is_named_even_when_its_peer_exits_first(tmp_path):
    """The failing rank takes 5 s to describe its error (SlowToDescribe): its peer, stopped once the
    process group goes, exits long before, and the agent stops the failing rank before torch's
    `record` would write the error. The launcher records it before the process group goes."""
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    model = {"_component_": "testkit.FailOnRank", "rank": 1, "at_call": 3, "describe_s": 5}
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), "train.epochs": 50, "model": model})
    proc = launcher(
        "run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", r), env=worker_env(**{marker: "1"}), timeout=120
    )
    assert proc.returncode == 1
    summary = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert summary == ["error: rank 1 failed (exit code 1): SlowToDescribe: injected failure on rank 1"], proc.stderr
    assert processes_with(marker) == []


def test_successful_run_leaves_no_process_and_no_warning(tmp_path):
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    proc = launcher("run", "--nproc", "2", path, env=worker_env(**{marker: "1"}))
    assert proc.returncode == 0, proc.stderr
    assert "destroy_process_group" not in proc.stderr and "not destroyed" not in proc.stderr.lower()
    assert "Warning" not in proc.stderr, proc.stderr
    assert processes_with(marker) == []
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "hang").exists()  # a run no one asked for a hang report leaves none


def test_ctrl_c_stops_all_workers(tmp_path):
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    gate = tmp_path / "never"
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "train.epochs": 50,
            "model": {"_component_": "testkit.WaitOnRank", "rank": 1, "at_call": 3, "until": str(gate)},
        }
    )
    path = write_recipe(tmp_path / "r.yaml", r)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "--nproc", "2", str(path)],
        env=worker_env(**{marker: "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # wait until training is under way (rank 0 logged a step), then press Ctrl-C on the whole group
    for line in proc.stdout:
        if line.startswith("step "):
            break
    os.killpg(
        proc.pid, signal.SIGINT
    )  # the first asks for a checkpoint at the end of the step, which rank 1 never ends
    time.sleep(1.0)  # a second press, not the same one passed on by the launcher
    os.killpg(proc.pid, signal.SIGINT)  # the second stops at once
    out, err = finish(proc, 120)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 60
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []
