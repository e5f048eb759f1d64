"""What a new user hits in the first hour: their own module in the current directory, errors in
their own code, threads, a slow precision on CPU, schedules that restart, plots of odd runs, sbatch
errors, a long step that looks like a hang."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DELETE, ROOT, finish, launcher, recipe_dict, tool, worker_env, write_recipe
from runs import gate, start, wait_for


def own_recipe(tmp_path: Path, **changes) -> Path:
    r = recipe_dict(
        **{
            "run.dir": str(tmp_path / "run"),
            "data.val": None,
            "train.epochs": 1,
            "model": {"_component_": "m.Net", "in_features": 8, "out_features": 1},
            **changes,
        }
    )
    return write_recipe(tmp_path / "r.yaml", r)


def console_script(*args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    """The installed `launcher` command, as a user types it (not `python -m launcher`)."""
    exe = tool("launcher")
    assert exe is not None, "the launcher console script is not installed next to this Python"
    return subprocess.run(
        [exe, *map(str, args)], cwd=cwd, env=env or worker_env(), capture_output=True, text=True, timeout=300
    )


def test_a_module_in_the_working_directory_is_importable_everywhere(tmp_path):
    (tmp_path / "m.py").write_text("import torch.nn as nn\nNet = nn.Linear\n")
    path = own_recipe(tmp_path)
    for args in (["check", path.name], ["run", "--nproc", "2", path.name]):
        proc = console_script(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "model.pt").exists()
    proc = console_script("check", path, cwd=tmp_path.parent)  # from elsewhere: says where it looked
    assert proc.returncode == 2
    assert f"looked in {tmp_path.parent} (the working directory)" in proc.stderr, proc.stderr


def test_an_error_in_the_users_module_names_its_file_and_line(tmp_path):
    (tmp_path / "m.py").write_text("import torch.nn as nn\n\nNet = nn.Linear\nscale = undefined_name * 2\n")
    path = own_recipe(tmp_path)
    proc = console_script("check", path.name, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (
        f"importing m failed at {tmp_path / 'm.py'}:4: NameError: name 'undefined_name' is not defined" in proc.stderr
    )
    proc = console_script("check", path.name, cwd=tmp_path, env=worker_env(LAUNCHER_DEBUG="1"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "undefined_name" in proc.stderr

    (tmp_path / "m.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, in_features, out_features):\n"
        "        super().__init__()\n        raise ValueError('bad width')\n"
    )
    proc = console_script("run", path.name, cwd=tmp_path)
    assert proc.returncode == 2 and f"failed at {tmp_path / 'm.py'}:7: ValueError: bad width" in proc.stderr, (
        proc.stderr
    )
    proc = console_script("run", path.name, cwd=tmp_path, env=worker_env(LAUNCHER_DEBUG="1"))
    assert "Traceback" in proc.stderr and "bad width" in proc.stderr


def test_threads_follow_the_cores_each_rank_has(tmp_path):
    from launcher.cluster.cpu import available_cores, threads_per_rank

    cores = available_cores()
    assert threads_per_rank(1, {}) == (cores, f"{cores} core{'s' if cores != 1 else ''} for 1 local rank")
    assert threads_per_rank(2, {})[0] == max(1, cores // 2)
    assert threads_per_rank(8, {"SLURM_CPUS_PER_TASK": "1"}) == (1, "SLURM_CPUS_PER_TASK=1")
    assert threads_per_rank(8, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS=3")
    env = worker_env()
    env.pop("OMP_NUM_THREADS")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), "train.max_steps": 1}))
    proc = launcher("run", path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"threads per rank +{cores} \({cores} cores? for 1 local rank\)", proc.stdout), proc.stdout
    proc = launcher("run", "--nproc", "2", path, "run.overwrite=true", "checkpoint.resume=none", env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"threads per rank +{max(1, cores // 2)} \({cores} cores? for 2 local ranks\)", proc.stdout), (
        proc.stdout
    )


def test_bf16_on_a_cpu_without_it_and_a_cosine_that_restarts_are_warned_about(tmp_path):
    from launcher.cluster.cpu import has_native_bf16

    r = recipe_dict(
        **{
            "train.precision": "bf16",
            "train.max_steps": 50,
            "train.epochs": DELETE,
            "scheduler": {"_component_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 20},
        }
    )
    proc = launcher("check", write_recipe(tmp_path / "r.yaml", r))
    assert proc.returncode == 0, proc.stderr
    slow = "warning: train.precision=bf16 on a CPU without native bf16"
    assert (slow in proc.stdout) == (has_native_bf16() is False), proc.stdout
    assert "warning: scheduler.T_max=20, but 50 steps follow the warmup" in proc.stdout
    assert "set scheduler.T_max=50" in proc.stdout
    r["scheduler"]["T_max"] = 50
    r["train"]["precision"] = "fp32"
    proc = launcher("check", write_recipe(tmp_path / "r.yaml", r))
    assert "warning" not in proc.stdout


def test_a_long_step_shows_life_within_seconds(tmp_path):
    until, waiting, model = gate(tmp_path, rank=0, at_call=2)
    path = write_recipe(
        tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), **model, "train.max_steps": 2})
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(path)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(waiting, proc)
    for line in proc.stdout:  # no step ends while the gate is shut: only the heartbeat can speak
        if "still running" in line:
            break
    until.touch()
    out, err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert line.startswith("step 1/2: still running after "), line


@pytest.mark.timeout(120)  # without the phase's lines it would wait for a line that never comes
def test_a_long_start_up_phase_says_what_it_does(tmp_path):
    # the data takes as long as the test likes to build: the run must speak meanwhile, then say how long
    until, waiting = tmp_path / "release", tmp_path / "waiting"
    train = {"_component_": "testkit.WaitsToRead", "until": str(until), "waiting": str(waiting)}
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), "data.train": train, "train.max_steps": 1})
    proc = start("run", write_recipe(tmp_path / "r.yaml", r))
    wait_for(waiting, proc)
    for line in proc.stdout:
        if "still running" in line:
            break
    until.touch()
    out, err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert line.startswith("reading the data (data.train, data.val): still running after "), line
    assert re.search(r"^reading the data \(data.train, data.val\): done in \d+ s$", out, re.M), out


def test_debug_evaluates_on_a_few_batches(tmp_path):
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), "data.val.size": 200})
    proc = launcher("debug", write_recipe(tmp_path / "r.yaml", r), "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_samples"] for r in rows if "val_samples" in r] == [16]  # 4 batches of 4, not 200


def test_plot_says_when_there_is_nothing_to_plot(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    proc = launcher("plot", run_dir)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {run_dir}: metrics.jsonl has no rows yet"), (
        proc.stderr
    )
    assert not (run_dir / "metrics.png").exists()


def test_short_rows_are_drawn_off_the_line():
    from launcher.commands.plot import split_short_rows

    rows = [
        {"step": s, "loss": 1.0, "samples": n} for s, n in ((20, 1280), (23, 192), (43, 1280), (46, 192), (66, 1280))
    ]
    full, short = split_short_rows(rows)
    assert [r["step"] for r in full] == [20, 43, 66] and [r["step"] for r in short] == [23, 46]
    assert split_short_rows([{"step": 1, "loss": 1.0}]) == ([{"step": 1, "loss": 1.0}], [])


def test_sbatch_errors_are_not_prefixed_twice(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # stands in for SLURM's own, which tests/test_slurm.py uses for real
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nosuch' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = worker_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    proc = launcher("slurm", path, "--gpus-per-node", "0", "--nproc-per-node", "2", "--submit", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: sbatch: invalid partition specified: nosuch", proc.stderr


def test_a_resume_path_that_is_gone_lists_the_checkpoints_that_exist(tmp_path):
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), "checkpoint.every_n_steps": 1, "train.max_steps": 4})
    assert launcher("run", write_recipe(tmp_path / "r.yaml", r)).returncode == 0
    gone = tmp_path / "run" / "checkpoints" / "step_00000001"
    proc = launcher("run", tmp_path / "r.yaml", f"checkpoint.resume={gone}", "train.max_steps=5")
    assert proc.returncode == 2, proc.stderr
    assert "holds step_00000004, step_00000003" in proc.stderr, proc.stderr


def test_a_run_that_crashed_before_its_first_step_does_not_block_its_rerun(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")  # what a run that died while starting leaves
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir)}))
    proc = launcher("run", path)
    assert proc.returncode == 0, proc.stderr
    assert f"the last run in {run_dir} ended before its first step and saved nothing" in proc.stderr
    again = launcher("run", path, "checkpoint.resume=none")  # now it holds a run: refused as before
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_doctor_imports_the_optional_stack_and_names_a_broken_package_with_its_cause(tmp_path):
    broken = tmp_path / "peft"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "try:\n    raise RuntimeError('operator torchvision::nms does not exist')\n"
        "except RuntimeError as e:\n    raise ImportError('cannot import peft') from e\n"
    )
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = launcher("doctor", env=env)
    assert proc.returncode != 0, proc.stdout
    assert "import peft" in proc.stdout and "caused by RuntimeError: operator torchvision::nms" in proc.stdout
    assert "transformers" in proc.stdout and "all checks passed" not in proc.stdout


def test_a_torchvision_that_does_not_match_torch_is_named_with_the_fix_by_doctor_and_a_transformers_recipe(
    tmp_path,
):
    """A torchvision built for another torch raises this at import; transformers imports torchvision
    whenever it is installed, so every transformers recipe failed with "Could not import module
    'GPT2LMHeadModel'" and doctor said only FAIL import torchvision. A real import failure: a package
    named torchvision, ahead on PYTHONPATH, whose import raises what a mismatched build raises."""
    from hfkit import lm_recipe
    from launcher.recipe.installed import matching_torchvision

    assert (matching_torchvision("2.4.1"), matching_torchvision("2.9.0")) == ("0.19.1", "0.24.0")
    fake = tmp_path / "shadow" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env["PYTHONPATH"]])
    import torch

    torch_version = torch.__version__
    pin = f"torchvision=={matching_torchvision(torch_version)}"
    says = re.compile(
        rf"torchvision \S+ does not match torch {re.escape(torch_version)} \(importing it fails: RuntimeError: "
        rf"operator torchvision::nms does not exist\): install the torchvision built for this torch \(pip install "
        rf"{re.escape(pin)}[^)]*\), or, where no recipe reads images, remove it \(pip uninstall torchvision\): "
        r"only the vision recipes need it, but transformers imports it whenever it is installed$"
    )
    proc = launcher("doctor", env=env)
    rows = {line.split()[2]: line for line in proc.stdout.splitlines() if line.strip().startswith("FAIL import")}
    assert proc.returncode == 1 and says.search(rows["torchvision"]), proc.stdout
    assert rows["transformers"].endswith("fails because torchvision does not match torch (see import torchvision)")
    path = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path, tmp_path / "run"))
    for command in ("check", "run"):
        proc = launcher(command, path, env=env)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        assert last.startswith("error: model: building launcher.models.hf.causal_lm failed: torchvision "), last
        assert says.search(last), last
    # a vision recipe, whose model is torchvision's own, says the same
    proc = launcher("check", ROOT / "recipes" / "cifar10_resnet18.yaml", env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: model._component_: importing torchvision.models"), last
    assert says.search(last), last


def test_another_model_in_the_same_run_directory_is_refused_before_any_worker_with_the_ways_on(tmp_path):
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir), "train.epochs": 1}))
    assert launcher("run", path).returncode == 0
    proc = launcher("run", "--nproc", "2", path, "model.sizes=[8,32,1]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "was saved from a different model" in line and "another name=... or run.dir=..." in line, line
    assert "launched by" not in proc.stdout  # the parent refused it: no worker printed its plan
    fresh = launcher("run", path, "model.sizes=[8,32,1]", "checkpoint.resume=none", "run.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr  # the way the message names works at once
