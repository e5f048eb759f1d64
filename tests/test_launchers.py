"""`launcher doctor`, and jobs started by other launchers (accelerate launch)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, launcher, recipe_dict, tool, worker_env, write_recipe
from runs import free_port


def test_doctor_with_two_gloo_ranks():
    proc = launcher("doctor", "--nproc", "2", "--timeout-s", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "world size 2" in out and "all checks passed" in out
    for check in (
        "backend",
        "backends built in",
        "versions",
        "master address",
        "master port",
        "process group",
        "all_reduce",
    ):
        assert f"ok   {check}" in out, out
    assert out.count(" cpu ") >= 2  # one row per rank
    # the oldest torch CI runs (2.4) with transformers 5, which turns its PyTorch support off there:
    # peft then fails to import, which is no broken install (the ddp path on 2.4 is supported) but is said
    from launcher.recipe.components import transformers_torch_off

    torch_off = transformers_torch_off()
    assert (torch_off is not None) == ("ok   transformers on torch" in out), out
    if torch_off is not None:
        assert "peft" not in out or re.search(r"peft \S+ \(unusable, see below\)", out), out


def test_a_lora_recipe_on_a_torch_too_old_for_transformers_names_torch_not_peft():
    """transformers 5 turns its PyTorch support off under torch 2.4, and importing peft then fails
    with NameError: name 'nn' is not defined. The line names the real cause (the oldest-torch CI run)."""
    from launcher.recipe.components import transformers_torch_off

    if transformers_torch_off() is None:
        pytest.skip("transformers can use this torch: the oldest-torch CI run checks this")
    proc = launcher("check", str(ROOT / "recipes" / "sft_lora.yaml"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.peft._component_: importing peft.LoraConfig failed: transformers "), line
    assert "turned its PyTorch support off: it needs a newer torch than 2.4" in line, line


def test_doctor_under_plain_torchrun_uses_the_agents_store(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # whether torchrun's agent shares its store with the workers depends on the torch version (2.4: no)
    probe = tmp_path / "probe.py"
    # one write (torchrun runs workers unbuffered, and two ranks' print() pieces can interleave)
    probe.write_text(
        "import os, sys\nsys.stdout.write('SHARED %s\\n' % os.environ.get('TORCHELASTIC_USE_AGENT_STORE'))\n"
    )
    shared = (
        "SHARED True"
        in subprocess.run([*torchrun, str(probe)], env=worker_env(), capture_output=True, text=True, timeout=120).stdout
    )
    proc = subprocess.run(
        [*torchrun, "-m", "launcher", "doctor"], env=worker_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("(served by torchrun's agent)" if shared else "(rank 0 serves the store)") in proc.stdout
    assert "all checks passed" in proc.stdout


def test_doctor_names_the_rank_that_never_joined():
    """Rank 0 of a 2-task SLURM job starts; rank 1's node never does."""
    env = worker_env(
        SLURM_JOB_ID="7",
        SLURM_JOB_NAME="train",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
        SLURM_NODEID="0",
        SLURM_TASKS_PER_NODE="1(x2)",
        SLURM_JOB_NODELIST="localhost",
        MASTER_PORT=free_port(),
    )
    proc = launcher("doctor", "--timeout-s", "3", env=env, timeout=120)
    assert proc.returncode == 1
    assert "FAIL ranks joined" in proc.stdout and "rank(s) 1 did not join within 3s" in proc.stdout, proc.stdout


@pytest.mark.skipif(tool("accelerate") is None, reason="accelerate is not installed (pip install '.[test]')")
def test_accelerate_launch_starts_a_two_rank_run(tmp_path):
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir)}))
    # on a machine without GPUs accelerate starts several processes only with --multi_gpu (through torchrun)
    proc = subprocess.run(
        [
            tool("accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "launcher",
            "run",
            str(path),
        ],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "world size             2" in proc.stdout and "done: completed after 6 steps" in proc.stdout


def test_the_job_summary_names_the_rank_that_recorded_an_error_even_if_the_agent_stopped_it_first(tmp_path, capsys):
    """torch's agent reports only the ranks that had exited when it noticed the first failure: a
    rank stopped because its peer failed can exit before the rank whose error stopped it. The
    summary reads every rank's error file from the newest attempt, not only the exited ranks'."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launcher.cluster import causes
    from launcher.train.local import _summarize

    def error_file(attempt: int, rank: int, message: str) -> None:
        path = tmp_path / "log" / "run-id_x1" / f"attempt_{attempt}" / str(rank) / "error.json"
        path.parent.mkdir(parents=True)
        extra = {"py_callstack": "...", "timestamp": "1700000000"}
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))

    error_file(0, 0, "ValueError: the first attempt's failure, already restarted from")
    error_file(1, 1, "ValueError: injected failure on rank 1")
    (tmp_path / "log" / "run-id_x1" / "attempt_1" / "0").mkdir()
    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(tmp_path / "none.json"))
    recorded = causes.last_attempt(tmp_path / "log")
    assert list(recorded) == [1]
    assert _summarize(ChildFailedError("launcher", {0: stopped}), recorded) == 1
    assert (
        capsys.readouterr().err.strip() == "error: rank 1 failed (exit code 1): ValueError: injected failure on rank 1"
    )
    assert _summarize(ChildFailedError("launcher", {0: stopped}), {}) == 1  # nothing recorded: the code passes on
    assert capsys.readouterr().err == ""


def test_nproc_from_a_directory_holding_a_folder_named_launcher_is_one_line_before_any_worker(tmp_path):
    """`python -m launcher` puts the directory it starts in first on the import path: the workers
    imported a user's folder named launcher there and died on an ImportError, reported as "rank 0 was
    killed by SIGTERM". So would a SLURM job submitted from there. The `launcher` command (its own
    directory first on the path, as here) runs one process from there as it is."""
    work = tmp_path / "work"
    (work / "launcher").mkdir(parents=True)
    (work / "launcher" / "__init__.py").write_text("")  # the user's own package of that name
    command = tmp_path / "bin" / "launcher_command.py"  # what the console script `launcher` runs
    command.parent.mkdir()
    command.write_text("from launcher.commands.cli import entry\n\nraise SystemExit(entry())\n")
    recipe = write_recipe(work / "r.yaml", recipe_dict(**{"train.epochs": 1}))

    def launcher_command(*args: str) -> subprocess.CompletedProcess:
        command_line = [sys.executable, str(command), *args, str(recipe), f"run.dir={tmp_path / 'run'}"]
        return subprocess.run(command_line, cwd=work, env=worker_env(), capture_output=True, text=True, timeout=300)

    for args in (["run", "--nproc", "2"], ["slurm", "--gpus-per-node", "2", "--submit"]):
        proc = launcher_command(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"error: {work / 'launcher'}: a folder named launcher in the directory the "), lines
        assert lines[0].endswith("run from another directory, or rename it"), lines
        assert not (tmp_path / "run").exists()
    proc = launcher_command("run")
    assert proc.returncode == 0 and "done: completed after" in proc.stdout, proc.stderr[-3000:]


def test_the_job_summary_names_the_rank_that_failed_not_one_the_agent_stopped_for_it(tmp_path, capsys):
    """Nothing recorded (a worker that died before the launcher could record, e.g. on an import): the
    rank that exited by itself is named, not a peer the agent stopped with SIGTERM in the same second."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launcher.train.local import _summarize

    none = str(tmp_path / "none.json")
    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=-15, error_file=none)
    failed = ProcessFailure(local_rank=1, pid=101, exitcode=1, error_file=none)
    failed.timestamp = stopped.timestamp
    assert _summarize(ChildFailedError("launcher", {0: stopped, 1: failed}), {}) == 1
    assert capsys.readouterr().err.strip() == (
        "error: rank 1 exited with code 1 before recording a cause (its own output above says why)"
    )
