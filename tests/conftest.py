from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT))
# nothing is downloaded: tests make their own tokenizers, models and data (and every process inherits this)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")

# A tiny regression recipe: 37 samples is odd on purpose (DistributedSampler pads, windows are partial).
BASE = {
    "name": "tiny",
    "seed": 0,
    "model": {"_component_": "launcher.models.MLP", "sizes": [8, 16, 16, 1]},
    "data": {
        "train": {"_component_": "launcher.datasets.synthetic.Regression", "size": 37, "in_dim": 8},
        "val": {"_component_": "launcher.datasets.synthetic.Regression", "size": 11, "in_dim": 8, "seed": 1},
        "batch_size": 4,
    },
    "loss": {"_component_": "torch.nn.MSELoss"},
    "optimizer": {"_component_": "torch.optim.AdamW", "lr": 0.01},
    "train": {"epochs": 2, "global_batch_size": 16},
    "log": {"every_n_steps": 1},
}


# a GPT recipe's model and sequences shrunk to train a few steps on a CPU in seconds
TINY_GPT_SHAPE = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=16",
    "data.train.seq_len=16",
    "data.val.seq_len=16",
]


def recipe_dict(**changes) -> dict:
    """BASE with dotted-key changes, e.g. recipe_dict(**{"train.epochs": 3})."""
    return changed(BASE, **changes)


def changed(recipe: dict, **changes) -> dict:
    """A copy of `recipe` with dotted-key changes (DELETE removes a key)."""
    r = copy.deepcopy(recipe)
    for dotted, value in changes.items():
        node = r
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return r


DELETE = object()


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tool(name: str) -> str | None:
    """A command-line tool, looked for next to this Python first: found in a venv that is not activated."""
    import shutil

    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def worker_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SUPPORT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints every thread's stack: how `finish` shows a hang
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher(*args, cwd=None, env=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` in a real subprocess. One that outlives `timeout` fails the test with
    every one of its processes' Python stacks (see `finish`)."""
    cmd = [sys.executable, "-m", "launcher", *map(str, args)]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = finish(proc, timeout)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launcher {' '.join(map(str, args))} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        )
    return result


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`proc.communicate(timeout)`; past the timeout, a hang: every Python process under `proc` (and
    `proc` itself) prints all its threads' stacks (faulthandler, on in worker_env, answers SIGABRT),
    then all are killed and the test fails with those stacks, so that a hang in CI is diagnosable
    from its log alone."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    tree = [*reversed(descendants(proc.pid)), proc.pid]  # the workers first: their parent relays nothing
    for pid in tree:
        _signal(pid, signal.SIGABRT)
        time.sleep(0.5)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in tree:
            _signal(pid, signal.SIGKILL)
        out, err = proc.communicate()
    for pid in tree:
        _signal(pid, signal.SIGKILL)
    raise AssertionError(
        f"{' '.join(map(str, proc.args))} did not finish in {timeout} s (a hang); each process's stacks follow\n"
        f"stdout:\n{(out or '')[-5000:]}\nstderr:\n{(err or '')[-30000:]}"
    )


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, parents before their children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def assert_close_rel(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).norm() / max(b[k].norm(), 1e-12)
        assert err <= rtol, f"{k}: relative difference {err:.3g} > {rtol}"


@pytest.fixture
def tmp_recipe(tmp_path):
    def make(name="recipe.yaml", **changes) -> Path:
        r = recipe_dict(**{"run.dir": str(tmp_path / "run"), **changes})
        return write_recipe(tmp_path / name, r)

    return make
