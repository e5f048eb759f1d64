"""Checkpoints and exact resume: an interrupted and resumed run ends with exactly (torch.equal) the
weights of an uninterrupted one. Dropout and per-sample data randomness make every RNG matter;
37 samples and global batch 16 make each epoch's last window partial (3 steps per epoch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from conftest import finish, launcher, load_weights, worker_env, write_recipe
from launcher.checkpoint import step_dirs
from launcher.cluster.env import ClusterEnv
from launcher.recipe.schema import validate
from launcher.train import assemble
from runs import assert_identical, gate, processes_with, recipe, start, wait_for


def in_process(run_dir: Path, **changes):
    return assemble.run(validate(recipe(run_dir, **changes)), ClusterEnv())


# ---------------------------------------------------------------- world size 1


@pytest.fixture(scope="module")
def reference_w1(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("w1") / "ref"
    assert in_process(run_dir).step == 9
    return load_weights(run_dir)


@pytest.mark.parametrize(
    "stop_at,where",
    [(2, "just before the epoch's partial last window"), (3, "at the end of an epoch"), (4, "mid-epoch")],
)
def test_resume_is_exact_at_world_size_1(tmp_path, reference_w1, stop_at, where):
    run_dir = tmp_path / "run"
    assert in_process(run_dir, **{"train.max_steps": stop_at}).step == stop_at, where
    state = in_process(run_dir)  # checkpoint.resume: auto
    assert state.step == 9
    assert_identical(load_weights(run_dir), reference_w1)
    steps = [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(9) >= 1  # one continuous history


def test_resume_is_exact_with_data_loader_workers(tmp_path, reference_w1):
    run_dir = tmp_path / "run"
    in_process(run_dir, **{"train.max_steps": 4, "data.num_workers": 2})
    in_process(run_dir, **{"data.num_workers": 1})
    assert_identical(load_weights(run_dir), reference_w1)
    import multiprocessing

    assert multiprocessing.active_children() == []  # no DataLoader worker outlives its run


def test_keep_last_and_weights_only_loading(tmp_path):
    run_dir = tmp_path / "run"
    in_process(run_dir, **{"checkpoint.every_n_steps": 1, "checkpoint.keep_last": 2})
    kept = [p.name for p in step_dirs.list_checkpoints(run_dir / "checkpoints")]
    assert kept == ["step_00000009", "step_00000008"]
    payload = step_dirs.load(run_dir / "checkpoints" / kept[0])  # torch.load(weights_only=True)
    assert payload["train_state"]["step"] == 9 and len(payload["rng"]) == 1
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "train_state", "rng", "recipe", "loggers"}


# ---------------------------------------------------------------- world size 2


def run2(tmp_path, name, run_dir, *extra, env=None, **changes):
    path = write_recipe(tmp_path / f"{name}.yaml", recipe(run_dir, **changes))
    return launcher("run", "--nproc", "2", *extra, path, env=env or worker_env(), timeout=300)


@pytest.fixture(scope="module")
def reference_w2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w2")
    proc = run2(tmp, "ref", tmp / "ref")
    assert proc.returncode == 0, proc.stderr
    return load_weights(tmp / "ref")


def test_resume_is_exact_at_world_size_2(tmp_path, reference_w2):
    run_dir = tmp_path / "run"
    assert run2(tmp_path, "a", run_dir, **{"train.max_steps": 4}).returncode == 0
    proc = run2(tmp_path, "b", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and "train.max_steps: 4 -> None" in proc.stdout
    assert_identical(load_weights(run_dir), reference_w2)


def test_preemption_signal_checkpoints_exits_with_requeue_code_and_resumes_exactly(tmp_path, reference_w2):
    run_dir, marker = tmp_path / "run", f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    # mid-way through step 4; the gate opens when the signal, relayed by the agent, reaches rank 0
    _, waiting, model = gate(tmp_path, rank=0, at_call=7, release_on=["SIGUSR1"])
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **model))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "--nproc", "2", str(path)],
        env=worker_env(**{marker: "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, proc)
    proc.send_signal(signal.SIGUSR1)  # as SLURM's --signal=USR1 would, to the launcher
    out, err = finish(proc, 180)
    assert proc.returncode == 75, err
    assert "preempted (SIGUSR1)" in err
    saved = step_dirs.find_latest(run_dir / "checkpoints")
    assert saved is not None and 4 <= step_dirs.load(saved)["train_state"]["step"] < 9
    assert not (run_dir / "model.pt").exists()  # training did not finish
    assert processes_with(marker) == []
    proc = run2(tmp_path, "resume", run_dir)  # the requeued job
    assert proc.returncode == 0, proc.stderr
    assert_identical(load_weights(run_dir), reference_w2)


def test_elastic_restart_after_sigkill_resumes_exactly(tmp_path, reference_w2):
    run_dir = tmp_path / "run"
    at_call = 9  # a fixed micro-step mid-epoch (of 18 in all): the test exercises the same kill every run
    until, waiting, model = gate(tmp_path, rank=1, at_call=at_call, first_attempt_only=True)
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **model, **{"checkpoint.every_n_steps": 2}))
    proc = start("run", "--nproc", "2", "--max-restarts", "1", path)
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)  # rank 1 dies mid-step
    out, err = finish(proc, 180)
    assert proc.returncode == 0, f"micro-step {at_call}\n{err}"
    assert "restart 1" in out  # the workers were restarted once...
    assert_identical(load_weights(run_dir), reference_w2)  # ...and finished exactly as if never interrupted


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


ASYNC = {"checkpoint.async_save": True, "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 9}


def test_async_checkpoints_are_written_while_training_goes_on_and_resume_exactly(tmp_path, reference_w2):
    """checkpoint.async_save on 2 ranks: step 2's write is held back (LAUNCHER_TEST_HOLD_WRITE, a
    handshake, not a timing) while training reaches step 3. Released, every checkpoint is complete
    and the run equals the synchronous one bit for bit; a run resumed from step 2's checkpoint
    (staged before step 3 changed the weights) does too."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **ASYNC, **{"log.every_n_steps": 1}))
    proc = start("run", "--nproc", "2", path, env=worker_env(LAUNCHER_TEST_HOLD_WRITE=str(release)))
    wait_for(run_dir / "metrics.jsonl", proc)
    while 3 not in _logged_steps(run_dir):
        assert proc.poll() is None, proc.communicate()
    assert not (run_dir / "checkpoints" / "step_00000002").exists()  # held, while step 3 trained
    release.touch()
    out, err = finish(proc, 300)
    assert proc.returncode == 0, err
    assert "written in the background" in out + err
    assert_identical(load_weights(run_dir), reference_w2)
    saved = step_dirs.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in saved] == [f"step_{n:08d}" for n in (9, 8, 6, 4, 2)]
    assert all(step_dirs.verify(p) is None for p in saved)
    again = write_recipe(
        tmp_path / "again.yaml",
        recipe(tmp_path / "again", **{"checkpoint.resume": str(run_dir / "checkpoints" / "step_00000002")}),
    )
    proc = launcher("run", "--nproc", "2", again)
    assert proc.returncode == 0, proc.stderr
    assert_identical(load_weights(tmp_path / "again"), reference_w2)


def test_a_launcher_killed_at_a_random_moment_of_async_checkpoints_resumes_exactly(tmp_path, reference_w2):
    """SIGKILL at a random moment after the first background write began (in one, or between
    them): the newest complete checkpoint is the resume point, and the run ends bit-identical."""
    import random
    import time

    run_dir = tmp_path / "run"
    # rank 1 parks at micro-step 16 of 18 until `until` exists: the kill always comes before the end
    until, _, model = gate(tmp_path, rank=1, at_call=16)
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **model, **{**ASYNC, "checkpoint.every_n_steps": 1}))
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    proc = start("run", "--nproc", "2", path, env=worker_env(**{marker: "1"}))
    wait_for(run_dir / "checkpoints", proc)
    delay_s = random.uniform(0.0, 1.0)  # whatever the moment, the assertions below hold
    time.sleep(delay_s)
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 60  # a limit, not a timing: the rerun must not meet a live worker
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(marker), "workers outlived their launcher"
    until.touch()
    proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 0, f"killed {delay_s:.2f} s after the first checkpoint began\n{proc.stderr}"
    assert_identical(load_weights(run_dir), reference_w2)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------- faults


def test_a_hung_rank_is_named_after_the_timeout(tmp_path):
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    until, waiting, model = gate(tmp_path, rank=1, at_call=3)  # never released
    proc = run2(tmp_path, "hang", tmp_path / "run", env=worker_env(**{marker: "1"}), **model, **{"dist.timeout_s": 3})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "timed out" in errors[0] and "rank(s) 1 did not arrive" in errors[0], proc.stderr
    assert processes_with(marker) == []


def test_nonfinite_loss_stops_naming_step_and_rank_and_saves_nothing_after(tmp_path):
    run_dir = tmp_path / "run"
    proc = run2(
        tmp_path,
        "nan",
        run_dir,
        **{
            "model": {"_component_": "testkit.NaNOnRank", "sizes": [8, 16, 1], "rank": 1, "at_call": 5},
            "checkpoint.every_n_steps": 1,
        },
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: non-finite loss at step 3 on rank 1 (train.on_nonfinite=stop); nothing after it "
        "was saved and the last checkpoint (step 2) is intact"
    ], proc.stderr
    latest = step_dirs.find_latest(run_dir / "checkpoints")
    payload = step_dirs.load(latest)
    assert payload["train_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    assert not (run_dir / "model.pt").exists()


def test_nonfinite_skip_skips_the_step_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = run2(
        tmp_path,
        "skip",
        run_dir,
        **{
            "model": {"_component_": "testkit.NaNOnRank", "sizes": [8, 16, 1], "rank": 1, "at_call": 5},
            "train.on_nonfinite": "skip",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 3: non-finite gradients, step skipped" in proc.stderr
    final = step_dirs.load(step_dirs.find_latest(run_dir / "checkpoints"))
    assert final["train_state"]["skipped_steps"] == 1 and final["train_state"]["step"] == 9
    assert all(torch.isfinite(v).all() for v in load_weights(run_dir).values())


def test_sigterm_to_the_whole_process_group_checkpoints_a_single_process(tmp_path):
    run_dir = tmp_path / "run"
    until, waiting, model = gate(tmp_path, rank=0, at_call=5)
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **model, **{"data.num_workers": 1}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(path)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(waiting, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # DataLoader workers get it too, and must survive it
    until.touch()
    out, err = finish(proc, 120)
    assert proc.returncode == 75, err
    assert "preempted (SIGTERM)" in err and "Traceback" not in err
    assert step_dirs.find_latest(run_dir / "checkpoints") is not None


# ---------------------------------------------------------------- checkpoint files


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path):
    """The process dies between state.pt and the COMPLETE marker (LAUNCHER_TEST_CRASH_AT: exactly
    there, every time, not wherever a race happens to land)."""
    ckpt_dir = tmp_path / "ckpts"
    step_dirs.write_checkpoint(ckpt_dir, 1, {"w": torch.ones(3)})
    code = (
        f"import torch; from pathlib import Path; from launcher.checkpoint import step_dirs; "
        f"step_dirs.write_checkpoint(Path({str(ckpt_dir)!r}), 2, {{'w': torch.zeros(1000)}})"
    )
    child = subprocess.run([sys.executable, "-c", code], env=worker_env(LAUNCHER_TEST_CRASH_AT="after-state"))
    assert child.returncode == -signal.SIGKILL
    partial = list(ckpt_dir.glob(".step_00000002.*.tmp"))
    assert len(partial) == 1 and (partial[0] / "state.pt").is_file() and not (partial[0] / "COMPLETE").exists()
    latest = step_dirs.find_latest(ckpt_dir)
    assert latest.name == "step_00000001" and torch.equal(step_dirs.load(latest)["w"], torch.ones(3))


def test_a_run_killed_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, reference_w1):
    run_dir = tmp_path / "run"
    in_process(run_dir, **{"train.max_steps": 4, "checkpoint.every_n_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **{"checkpoint.every_n_steps": 2}))
    proc = launcher("run", path, env=worker_env(LAUNCHER_TEST_CRASH_AT="after-state"))
    assert proc.returncode == -signal.SIGKILL  # died writing step 6, after state.pt, before COMPLETE
    assert step_dirs.find_latest(run_dir / "checkpoints").name == "step_00000004"
    assert launcher("run", path).returncode == 0  # removes the half-written one and resumes from step 4
    assert_identical(load_weights(run_dir), reference_w1)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    ckpt_dir = tmp_path / "ckpts"
    for step in (1, 2, 3):
        step_dirs.write_checkpoint(ckpt_dir, step, {"w": torch.full((4,), float(step))})
    (ckpt_dir / "step_00000003" / "COMPLETE").unlink()  # as if the write had stopped before the marker
    state = ckpt_dir / "step_00000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))  # a flipped byte
    import logging

    logger = logging.getLogger("launcher")
    propagate, logger.propagate = logger.propagate, True  # caplog listens at the root logger
    try:
        with caplog.at_level("WARNING", logger="launcher"):
            latest = step_dirs.find_latest(ckpt_dir)
    finally:
        logger.propagate = propagate
    assert latest.name == "step_00000001"
    assert "step_00000003: incomplete" in caplog.text and "step_00000002: state.pt is corrupt" in caplog.text


def test_bad_resume_paths_and_other_models_are_one_line_errors(tmp_path):
    run_dir = tmp_path / "run"
    in_process(run_dir, **{"train.max_steps": 2})
    for override, phrase in [
        (f"checkpoint.resume={tmp_path / 'nope'}", "does not exist"),
        (f"checkpoint.resume={tmp_path}", "not a checkpoint (expected a step_N/ directory"),
        (
            "model.sizes=[8,32,1]",
            "was saved from a different model: unexpected keys [net.7.weight, net.7.bias]; "
            "shape mismatches [net.1.weight (16, 8) vs model (32, 8)",
        ),
    ]:
        proc = launcher("run", write_recipe(tmp_path / "r.yaml", recipe(run_dir)), override)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: checkpoint.resume: "), proc.stderr
        assert phrase in proc.stderr, proc.stderr


# ---------------------------------------------------------------- checkpoints from older versions

GOLDEN = Path(__file__).parent / "golden" / "checkpoint_format1"


def test_a_format_1_checkpoint_resumes_to_the_weights_its_own_version_reached(tmp_path):
    """Pins the on-disk format on purpose. tests/golden/checkpoint_format1 was written by launcher at
    commit 7b4d025, before the Stateful checkpointer (format 1): step_00000004 is this module's
    resumable recipe stopped at step 4, model_step9.pt that version's uninterrupted 9-step run. The
    new code reads the old payload (upgrading it) and continues to the same weights. Compared to
    float tolerance, not bit for bit: the file was made on another machine, whose CPU kernels may
    round differently (on the machine that made it, it matches bit for bit); and only on the torch
    version that made it, as dropout's random draws differ between torch versions."""
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(GOLDEN / "step_00000004", run_dir / "checkpoints" / "step_00000004")
    assert in_process(run_dir).step == 9  # checkpoint.resume: auto finds it, on any torch
    made_with = json.loads((GOLDEN / "made_with.json").read_text())["torch"]
    if torch.__version__.split(".")[:2] != made_with.split(".")[:2]:
        pytest.skip(f"the weights are compared on torch {made_with}: random draws differ between versions")
    expected = torch.load(GOLDEN / "model_step9.pt", weights_only=True)
    got = load_weights(run_dir)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize(
    "payload,phrase",
    [
        ({"format": 99}, "is in checkpoint format 99, newer than this launcher reads (1 to 2)"),
        ({"weights": 1}, "holds no launcher checkpoint (no format number)"),
    ],
)
def test_a_checkpoint_in_an_unknown_format_is_refused_in_one_line(tmp_path, payload, phrase):
    run_dir = tmp_path / "run"
    step_dirs.write_checkpoint(run_dir / "checkpoints", 3, payload)
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", recipe(run_dir)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: checkpoint.resume: "), proc.stderr
    assert phrase in proc.stderr, proc.stderr
