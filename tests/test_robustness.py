"""Faults and mistakes that must not leave a mess: a resume that changes the maths, a shared checkpoint
directory, a killed launcher, two runs in one directory, a torn metrics row, paths that cannot be
written, a full disk, a diverging run, a changed optimizer, an unreachable wandb server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import finish, launcher, load_weights, recipe_dict, worker_env, write_recipe
from launcher.checkpoint import step_dirs
from runs import assert_identical, gate, processes_with, wait_for


def errors_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def one_error(proc, code: int = 2) -> str:
    """The process exited `code` with exactly one stderr line, an `error:` line, and no traceback."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = errors_of(proc)
    assert len(errors) == 1, proc.stderr
    return errors[0]


def run(tmp_path, *args, name="r.yaml", env=None, timeout=180, **changes):
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), **changes})
    return launcher("run", *args, write_recipe(tmp_path / name, r), env=env, timeout=timeout)


# ---------------------------------------------------------------- resuming with other batch arithmetic


def test_resume_with_another_global_batch_is_one_error_not_an_endless_loop(tmp_path):
    assert run(tmp_path, **{"train.max_steps": 2}).returncode == 0  # 37 samples, 3 steps of 16 per epoch
    line = one_error(run(tmp_path, **{"train.global_batch_size": 32}, timeout=120))
    assert line.startswith("error: train.global_batch_size: ") and "global batch of 16" in line
    assert "train.global_batch_size=16" in line


def test_resume_on_more_ranks_without_a_fixed_global_batch_names_the_key(tmp_path):
    # global_batch_size null: 4 x 1 rank, then 4 x 2 ranks, the realistic trigger
    assert run(tmp_path, **{"train.global_batch_size": None, "train.max_steps": 5}).returncode == 0
    line = one_error(run(tmp_path, "--nproc", "2", **{"train.global_batch_size": None}, timeout=120))
    assert line.startswith("error: train.global_batch_size: ") and "train.global_batch_size=4" in line
    # checkpoints from before the global batch was in the marker: the workers refuse it, one line
    marker = next((tmp_path / "run" / "checkpoints").glob("step_*")) / "COMPLETE"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "global_batch"}))
    line = one_error(run(tmp_path, "--nproc", "2", **{"train.global_batch_size": None}, timeout=120))
    assert "train.global_batch_size: " in line and "train.global_batch_size=4" in line


def test_resume_whose_position_no_longer_fits_the_epoch_names_the_data(tmp_path):
    assert run(tmp_path, **{"train.max_steps": 2}).returncode == 0  # step 2 of 3 in epoch 0
    line = one_error(run(tmp_path, **{"data.train.size": 20}, timeout=120))  # now 2 steps per epoch
    assert line.startswith("error: data.train: ") and "stopped at step 2 of an epoch" in line


def test_resume_with_another_optimizer_is_one_error(tmp_path):
    assert run(tmp_path, **{"train.max_steps": 2}).returncode == 0
    proc = run(tmp_path, **{"train.max_steps": 3, "optimizer.lr": 0.5})  # the same class: resumes, and says
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: optimizer.lr changed, but the optimizer and scheduler continue with the values saved" in proc.stderr
    )
    line = one_error(run(tmp_path, **{"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}}))
    assert line.startswith("error: optimizer._component_: ") and "torch.optim.AdamW" in line


# ---------------------------------------------------------------- what run.overwrite may delete


def test_overwrite_deletes_only_launcher_checkpoints_and_refuses_a_shared_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("not the launcher's")
    changes = {"checkpoint.dir": str(shared), "train.max_steps": 2}
    assert run(tmp_path, **changes).returncode == 0
    assert step_dirs.find_latest(shared) is not None
    line = one_error(run(tmp_path, **changes, **{"run.overwrite": True, "checkpoint.resume": "none"}))
    assert line.startswith("error: checkpoint.dir: ") and "notes.txt" in line
    assert (shared / "notes.txt").read_text() == "not the launcher's"
    assert step_dirs.find_latest(shared) is not None  # refused: nothing deleted

    (shared / "notes.txt").unlink()
    proc = run(tmp_path, **{**changes, "run.overwrite": True, "checkpoint.resume": "none", "train.max_steps": 1})
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in step_dirs.list_checkpoints(shared)] == ["step_00000001"]  # the old run's are gone


# ---------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_workers_die_with_a_killed_launcher(tmp_path):
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    until, waiting, model = gate(tmp_path, rank=1, at_call=3)  # never released: the run is parked mid-step
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), **model})
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "--nproc", "2", str(write_recipe(tmp_path / "r.yaml", r))],
        env=worker_env(**{marker: "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(waiting, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    proc.communicate()
    deadline = time.monotonic() + 60
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == [], "workers outlived their launcher"


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_error_while_dataloader_workers_read_ends_the_process(tmp_path, split):
    """A bad sample met in a DataLoader worker is the one line naming its key, and the process
    exits: its workers ignore SIGTERM (preemption must not kill them first), and the failed
    loader's iterator, kept alive by the error, once held the exit forever."""
    broken = {"_component_": "testkit.FailsToFetch", "at_index": 5, "size": 37 if split == "train" else 11}
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), f"data.{split}": broken, "data.num_workers": 2})
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", r), timeout=120)  # a hang is a TimeoutExpired
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data.{split}.at_index: sample 5 is bad"), (
        proc.stderr[-3000:]
    )


def test_a_second_run_in_the_same_directory_is_refused_naming_the_first(tmp_path):
    until, waiting, model = gate(tmp_path, rank=0, at_call=3)
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), **model})
    path = write_recipe(tmp_path / "r.yaml", r)
    first = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(path)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, first)
    for args in (["run", path], ["run", "--nproc", "2", path]):
        line = one_error(launcher(*args))
        assert line.startswith("error: run.dir: ") and f"pid {first.pid} on {socket.gethostname()}" in line, line
    until.touch()
    out, err = finish(first, 120)
    assert first.returncode == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # one run's history, whole


def test_a_run_that_shares_a_running_runs_checkpoint_dir_is_refused_and_deletes_nothing(tmp_path):
    """B names A's checkpoint.dir while A trains: B once resumed A's checkpoints, or with
    run.overwrite deleted them, and A's last step directory was replaced by B's."""
    shared = tmp_path / "shared"
    until, waiting, model = gate(tmp_path, rank=0, at_call=9)  # parked in step 3: steps 1 and 2 saved
    changes = {"checkpoint.dir": str(shared), "checkpoint.every_n_steps": 1, "checkpoint.keep_last": 9}
    a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "run",
            str(write_recipe(tmp_path / "a.yaml", recipe_dict(**{"run.dir": str(tmp_path / "a"), **changes, **model}))),
        ],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, a)
    saved = {p.name: (p / "COMPLETE").read_bytes() for p in step_dirs.list_checkpoints(shared)}
    assert sorted(saved) == ["step_00000001", "step_00000002"]
    b = recipe_dict(**{"run.dir": str(tmp_path / "b"), **changes, "run.overwrite": True, "checkpoint.resume": "none"})
    line = one_error(launcher("run", write_recipe(tmp_path / "b.yaml", b)))
    assert line.startswith(f"error: checkpoint.dir: {shared} is in use by pid {a.pid} on "), line
    assert {p.name: (p / "COMPLETE").read_bytes() for p in step_dirs.list_checkpoints(shared)} == saved
    until.touch()
    out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    latest = step_dirs.find_latest(shared)
    assert step_dirs.read_marker(latest)["run_dir"] == str((tmp_path / "a").resolve())
    assert_identical(load_weights(tmp_path / "a"), step_dirs.load(latest)["model"])  # A's weights are its checkpoint's


def test_sigterm_before_any_checkpoint_does_not_claim_one(tmp_path):
    until, waiting = tmp_path / "release", tmp_path / "waiting"
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "data.val": None,
            "data.train": {"_component_": "testkit.UnprotectedGate", "until": str(until), "waiting": str(waiting)},
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "--nproc", "2", str(write_recipe(tmp_path / "r.yaml", r))],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # both ranks in the gate: a rank still starting would take the signal as a preemption to honour
    deadline = time.monotonic() + 120
    while len(list(waiting.glob("*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks never reached the gate"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the workers die of it: they checkpoint nothing
    out, err = finish(proc, 180)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "no checkpoint was written" in err and "checkpointed" not in err


# ---------------------------------------------------------------- files


def test_a_torn_last_metrics_row_is_dropped_and_the_history_continues(tmp_path):
    assert run(tmp_path, **{"train.max_steps": 2}).returncode == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')  # a crash mid-write
    proc = run(tmp_path, **{"train.max_steps": 4})
    assert proc.returncode == 0, proc.stderr
    assert "warning: " in proc.stderr and "incomplete line" in proc.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_file_where_a_directory_must_be_fails_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for key in ("checkpoint.dir", "run.dir"):
        changes = {key: str(blocker)}
        line = one_error(run(tmp_path, **changes))
        assert line.startswith(f"error: {key}: {blocker} is a file"), line
        line = one_error(launcher("check", write_recipe(tmp_path / "c.yaml", recipe_dict(**changes))))
        assert line.startswith(f"error: {key}: "), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_check_refuses_a_resume_path_that_is_not_a_checkpoint_and_notes_a_missing_one(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    path = write_recipe(tmp_path / "c.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    line = one_error(launcher("check", path, f"checkpoint.resume={text}"))
    assert line.startswith(f"error: checkpoint.resume: {text}: not a checkpoint"), line
    proc = launcher("check", path, f"checkpoint.resume={tmp_path / 'on-the-cluster'}")  # may exist where it runs
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint.resume: {tmp_path / 'on-the-cluster'} does not exist" in proc.stdout + proc.stderr


def test_an_unwritable_run_directory_fails_before_the_workers_start(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (an unwritable directory, even for root) is not available here")
    try:
        line = one_error(run(tmp_path, "--nproc", "2"))
        assert line.startswith("error: run.dir: cannot write in "), line
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    assert run(tmp_path, **{"train.max_steps": 2}).returncode == 0
    stale = [tmp_path / "run" / ".model.pt.abc123.tmp", tmp_path / "run" / "checkpoints" / ".step_00000003.x.tmp"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    keep = tmp_path / "run" / "notes.model.pt.tmp"  # not the launcher's pattern: left alone
    keep.write_text("mine")
    assert run(tmp_path, **{"train.max_steps": 3}).returncode == 0
    assert not any(p.exists() for p in stale) and keep.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_the_run_writes_follows_the_umask(tmp_path, umask):
    code = f"import os, sys; os.umask({umask}); from launcher.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), "train.max_steps": 2}))
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(path)], env=worker_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    step = step_dirs.find_latest(run_dir / "checkpoints")
    files = [run_dir / n for n in ("model.pt", "config.yaml", "metrics.jsonl", "startup.json")] + [
        step / "state.pt",
        step / "COMPLETE",
    ]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(stat.S_IMODE(step.stat().st_mode)) == oct(0o777 & ~umask)


def test_a_full_disk_is_one_line_naming_the_path_and_the_previous_checkpoint_survives(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    recipe = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "checkpoint.dir": str(mount / "ckpt"),
            "checkpoint.every_n_steps": 1,
            "checkpoint.keep_last": 5,
            "train.epochs": 3,
            "model.sizes": [8, 256, 1],
        }
    )  # ~27 KB a checkpoint: the 3rd does not fit in 96 KB
    path = write_recipe(tmp_path / "r.yaml", recipe)
    script = (
        f"mount -t tmpfs -o size=96k tmpfs {mount} || exit 99; "
        f"{sys.executable} -m launcher run {path}; code=$?; ls {mount}/ckpt > {tmp_path}/left.txt; "
        f"cp -r {mount}/ckpt {tmp_path}/copy; exit $code"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=worker_env(), capture_output=True, text=True, timeout=180
    )
    if proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    line = one_error(proc, code=1)
    assert line.startswith(f"error: writing {mount / 'ckpt'}/step_") and f"no space left on {mount / 'ckpt'}" in line, (
        line
    )
    assert "MiB free there" in line and "; the previous checkpoint (step_" in line and line.endswith(") is intact")
    latest = step_dirs.find_latest(tmp_path / "copy")
    assert latest is not None and step_dirs.verify(latest) is None
    assert not [n for n in (tmp_path / "left.txt").read_text().split() if n.endswith(".tmp")]  # no half checkpoint


# ---------------------------------------------------------------- diverging runs and restarts


def test_skipping_non_finite_steps_stops_after_too_many_in_a_row(tmp_path):
    proc = run(
        tmp_path,
        **{
            "model": {"_component_": "testkit.NaNInBackward"},
            "train.on_nonfinite": "skip",
            "train.max_consecutive_skips": 3,
            "data.val": None,
        },
    )
    line = one_error(proc, code=1)
    assert "non-finite gradients in 3 steps in a row, up to step 3" in line and "train.max_consecutive_skips=3" in line
    assert not (tmp_path / "run" / "model.pt").exists()


def test_an_elastic_restart_says_which_rank_died_and_how(tmp_path):
    until, waiting, model = gate(tmp_path, rank=1, at_call=4, first_attempt_only=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "run",
            "--nproc",
            "2",
            "--max-restarts",
            "1",
            str(write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), **model}))),
        ],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)
    out, err = finish(proc, 180)
    assert proc.returncode == 0, err
    assert "warning: rank 1 (pid " in err and "was killed by SIGKILL; restarting the workers" in err, err
    assert "(restart 1 of 1)" in err


def test_a_damaged_checkpoint_is_reported_once_as_a_warning_on_stderr(tmp_path):
    assert run(tmp_path, "--nproc", "2", **{"train.max_steps": 2, "checkpoint.every_n_steps": 1}).returncode == 0
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").unlink()
    proc = run(tmp_path, "--nproc", "2", **{"train.max_steps": 3})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipping checkpoint") == 1, proc.stderr
    assert "warning: skipping checkpoint" in proc.stderr and "skipping" not in proc.stdout


# ---------------------------------------------------------------- wandb


class _SilentServer:
    """A TCP server on loopback that accepts connections and never answers (a network black hole)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        try:
            while True:
                self.held.append(self.sock.accept()[0])
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def test_wandb_auto_with_a_key_and_no_answering_server_logs_offline_at_once(tmp_path):
    server = _SilentServer()
    try:
        env = worker_env(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{server.port}")
        proc = run(tmp_path, env=env, **{"train.max_steps": 2, "log.wandb": {"mode": "auto"}})
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "did not answer within 3 s; logging offline" in proc.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")), "wandb did not log offline"
    assert "could not start" not in proc.stderr


def test_a_secret_given_as_an_override_is_not_in_wandb_files(tmp_path):
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "train.max_steps": 2,
            "log.wandb": {"mode": "offline"},
            "data.train": {"_component_": "testkit.PrivateRegression", "api_token": "placeholder"},
        }
    )
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", r), "data.train.api_token=OVERRIDE-SECRET-42")
    assert proc.returncode == 0, proc.stderr
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for p in files:
        assert b"OVERRIDE-SECRET-42" not in p.read_bytes(), p


# ---------------------------------------------------------------- the model's init does not depend on the data


def _initial_weights(tmp_path, name, **changes) -> dict[str, torch.Tensor]:
    from launcher.data.builders import build_datasets, build_model
    from launcher.recipe.schema import validate

    recipe = validate(recipe_dict(**{"run.dir": str(tmp_path / name), **changes}))
    build_datasets(recipe)  # built first, as in a run
    return build_model(recipe).state_dict()


def test_initial_weights_do_not_depend_on_the_datasets(tmp_path):
    random_val = {"_component_": "testkit.RandomlyBuiltRegression", "size": 11, "seed": 1}
    random_train = {"_component_": "testkit.RandomlyBuiltRegression", "size": 37, "draws": 77}
    base = _initial_weights(tmp_path, "a")
    for changes in ({"data.val": None}, {"data.val": random_val}, {"data.train": random_train}, {"data.seed": 123}):
        other = _initial_weights(tmp_path, "b", **changes)
        assert all(torch.equal(base[k], other[k]) for k in base), changes
    assert not torch.equal(base["1.weight"], _initial_weights(tmp_path, "c", seed=1)["1.weight"])


def test_adding_a_validation_set_that_draws_random_numbers_changes_no_weight(tmp_path):
    val = {"_component_": "testkit.RandomlyBuiltRegression", "size": 11, "seed": 1}
    assert run(tmp_path, name="a.yaml", **{"run.dir": str(tmp_path / "a"), "data.val": None}).returncode == 0
    assert run(tmp_path, name="b.yaml", **{"run.dir": str(tmp_path / "b"), "data.val": val}).returncode == 0
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_seed_changes_the_order_but_not_the_init(tmp_path):
    assert run(tmp_path, name="a.yaml", **{"run.dir": str(tmp_path / "a"), "train.max_steps": 1}).returncode == 0
    assert (
        run(
            tmp_path, name="b.yaml", **{"run.dir": str(tmp_path / "b"), "train.max_steps": 1, "data.seed": 7}
        ).returncode
        == 0
    )
    assert (
        run(
            tmp_path, name="c.yaml", **{"run.dir": str(tmp_path / "c"), "train.max_steps": 1, "data.seed": 0}
        ).returncode
        == 0
    )
    a, b, c = (load_weights(tmp_path / n) for n in "abc")
    assert not torch.equal(a["1.weight"], b["1.weight"])  # other samples in step 1
    assert all(torch.equal(a[k], c[k]) for k in a)  # data.seed 0 == the recipe's seed 0


# ---------------------------------------------------------------- Ctrl-C, and the log rows around a stop


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("nproc", [None, 2])
def test_ctrl_c_checkpoints_and_the_resumed_log_rows_match_an_uninterrupted_run(tmp_path, nproc):
    from runs import recipe as resumable

    every = {"log.every_n_steps": 4}
    extra = ["--nproc", str(nproc)] if nproc else []
    ref = tmp_path / "ref"
    proc = launcher("run", *extra, write_recipe(tmp_path / "ref.yaml", resumable(ref, **every)))
    assert proc.returncode == 0, proc.stderr

    run_dir = tmp_path / "run"
    # inside step 5 (one process stops right after it); inside step 6 (two ranks agree one step later)
    until, waiting, model = gate(tmp_path, rank=0, at_call=16 if nproc is None else 10)
    path = write_recipe(tmp_path / "r.yaml", resumable(run_dir, **model, **every))
    first = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", *extra, str(path)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(waiting, first)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole foreground group
    until.touch()
    out, err = finish(first, 180)
    assert first.returncode == 130, err
    assert "Traceback" not in err, err
    saved = step_dirs.find_latest(run_dir / "checkpoints")
    step = step_dirs.load(saved)["train_state"]["step"]
    # one process: exactly 5. Two ranks agree a step later (7), or during the evaluation that ends
    # epoch 2 (6, if the signal reached them in step 6's first micro-batch), or at 8 if it came late
    assert step == 5 if nproc is None else step in (6, 7, 8), step
    assert not (run_dir / "model.pt").exists()

    proc = launcher("run", *extra, path)  # the same command continues
    assert proc.returncode == 0, proc.stderr
    want, got = _losses(ref), _losses(run_dir)
    assert sorted(got) == sorted(want) == [3, 4, 6, 8, 9]
    for step in want:  # e.g. row 6 averages steps 5 and 6 in both, though 5 ran before the stop
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_a_stop_signal_does_not_wait_for_a_long_evaluation_which_runs_again_on_resume(tmp_path):
    from runs import recipe as resumable

    changes = {"data.val.size": 40, "train.eval_every_steps": 2}  # 10 evaluation batches of 4
    ref = tmp_path / "ref"
    assert launcher("run", write_recipe(tmp_path / "ref.yaml", resumable(ref, **changes))).returncode == 0
    run_dir = tmp_path / "run"
    until, waiting, model = gate(tmp_path, rank=0, at_call=3, in_eval=True)  # the first evaluation, at step 2
    path = write_recipe(tmp_path / "r.yaml", resumable(run_dir, **model, **changes))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(path)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, proc)
    proc.send_signal(signal.SIGTERM)
    until.touch()
    out, err = finish(proc, 120)
    assert proc.returncode == 75, err
    saved = step_dirs.load(step_dirs.find_latest(run_dir / "checkpoints"))["train_state"]
    assert saved["step"] == 2 and saved["pending_eval"] is True  # stopped inside the evaluation
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "val_loss" in r]  # the cut-short evaluation logged nothing
    assert launcher("run", path).returncode == 0
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = lambda rows: [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]  # noqa: E731
    assert evals(got) == evals(want) and evals(want)[0][0] == 2
    assert all(
        torch.equal(a, b) for a, b in zip(load_weights(ref).values(), load_weights(run_dir).values(), strict=True)
    )


def test_debug_leaves_a_checkpoint_dir_of_the_recipes_own_alone(tmp_path):
    shared = tmp_path / "ckpts"
    changes = {"checkpoint.dir": str(shared), "train.max_steps": 2, "checkpoint.every_n_steps": 1}
    assert run(tmp_path, **changes).returncode == 0
    before = sorted(p.name for p in shared.iterdir())
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), **changes})
    proc = launcher("debug", write_recipe(tmp_path / "d.yaml", r), "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in shared.iterdir()) == before  # the real run's checkpoints, untouched
    assert step_dirs.find_latest(tmp_path / "run" / "debug" / "checkpoints") is not None
