"""The directories a run writes, function by function: the locks that keep two runs out of each
other's run.dir and checkpoint.dir, checkpoints that name the run that wrote them, and the
preemption report that compares the checkpoints on disk, not clocks; and a full or read-only
filesystem, which is one line naming the path and what is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import worker_env
from launcher.checkpoint import step_dirs
from launcher.checkpoint.rundir import RunDir
from launcher.errors import RecipeError

# ---------------------------------------------------------------- locks


def test_a_run_that_shares_another_runs_checkpoint_dir_is_refused_while_it_runs(tmp_path):
    shared = tmp_path / "shared"
    with RunDir(tmp_path / "a", shared).locked():
        with pytest.raises(RecipeError) as e, RunDir(tmp_path / "b", shared).locked():
            pass
        assert e.value.key == "checkpoint.dir" and f"{shared} is in use by pid {os.getpid()}" in e.value.message
        assert f"(run.dir {tmp_path / 'a'})" in e.value.message
        with pytest.raises(RecipeError) as e:
            RunDir(tmp_path / "c", shared).check_unlocked()  # the --nproc parent's check
        assert e.value.key == "checkpoint.dir"
    own = tmp_path / "a" / "checkpoints"  # its default checkpoint directory, named as another run's checkpoint.dir
    with RunDir(tmp_path / "a", own).locked(), pytest.raises(RecipeError, match="is in use by"):
        RunDir(tmp_path / "d", own).locked().__enter__()
    with RunDir(tmp_path / "b", shared).locked():  # the first run ended: its locks are free
        pass
    with RunDir(tmp_path / "e", tmp_path / "e").locked():  # checkpoint.dir = run.dir: one lock, taken once
        pass


@pytest.mark.parametrize("kind", ["link", "directory"])
def test_a_lock_that_is_a_link_or_a_directory_is_refused_and_nothing_is_written_through_it(tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    if kind == "link":
        (run_dir / ".lock").symlink_to(target)
    else:
        (run_dir / ".lock").mkdir()
    layout = RunDir(run_dir, run_dir / "checkpoints")
    for attempt in (layout.preflight, layout.check_unlocked, lambda: layout.locked().__enter__()):
        with pytest.raises(RecipeError) as e:
            attempt()
        what = "symbolic link" if kind == "link" else kind
        assert e.value.key == "run.dir" and f"{run_dir / '.lock'} is a {what}" in e.value.message, e.value.message
        assert "remove it" in e.value.message
    assert target.read_text() == "keep me\n"


def test_a_linked_hf_export_directory_is_refused_before_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    (run_dir / "hf").symlink_to(elsewhere)
    problems = RunDir(run_dir, run_dir / "checkpoints").problems()
    assert [(e.key, certain) for e, certain in problems] == [("run.dir", True)]
    assert f"{run_dir / 'hf'} is a symbolic link" in problems[0][0].message
    assert (elsewhere / "config.json").exists()


def test_a_linked_metrics_log_is_refused_and_its_target_is_neither_written_nor_emptied(tmp_path):
    from launcher.observe.metrics import JsonlSink

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (run_dir / "metrics.jsonl").symlink_to(target)
    problems = RunDir(run_dir, run_dir / "checkpoints").problems()
    assert [(e.key, certain) for e, certain in problems] == [("run.dir", True)]
    assert f"{run_dir / 'metrics.jsonl'} is a symbolic link" in problems[0][0].message
    with pytest.raises(RecipeError, match="is a symbolic link"):
        JsonlSink(run_dir / "metrics.jsonl")  # a fresh start's: it once emptied the target
    assert target.read_text() == "keep me\n"


# ---------------------------------------------------------------- checkpoints that name their run


def _save(directory: Path, step: int, owner: str | None, value: float = 0.0) -> Path:
    return step_dirs.write_checkpoint(directory, step, {"w": torch.full((2,), value)}, owner=owner)


def test_a_save_never_replaces_another_runs_step_directory(tmp_path):
    shared = tmp_path / "shared"
    mine, theirs = str(tmp_path / "a"), str(tmp_path / "b")
    path = _save(shared, 3, theirs, 1.0)
    with pytest.raises(RecipeError) as e:
        _save(shared, 3, mine, 2.0)
    assert e.value.key == "checkpoint.dir" and f"written by another run ({theirs})" in e.value.message
    assert step_dirs.verify(path) is None and torch.equal(step_dirs.load(path)["w"], torch.full((2,), 1.0))
    assert [p.name for p in shared.iterdir()] == ["step_00000003"]  # no temporary left behind
    _save(shared, 3, theirs, 4.0)  # the same run saving its step again (after a restart) replaces it
    assert torch.equal(step_dirs.load(path)["w"], torch.full((2,), 4.0))
    (path / step_dirs.STATE).write_bytes(b"damaged")  # a copied run's checkpoint, resumed from the one before it
    assert step_dirs.verify(path) is not None
    _save(shared, 3, mine, 5.0)  # worth nothing: replaced
    assert step_dirs.verify(path) is None and torch.equal(step_dirs.load(path)["w"], torch.full((2,), 5.0))


def test_pruning_and_overwrite_leave_another_runs_checkpoints(tmp_path):
    shared = tmp_path / "shared"
    a, b = RunDir(tmp_path / "a", shared), RunDir(tmp_path / "b", shared)
    for step in (1, 2):
        _save(shared, step, a.owner)
    _save(shared, 3, b.owner)
    step_dirs.prune(shared, 1, b.owner)
    assert [p.name for p in step_dirs.list_checkpoints(shared)] == ["step_00000003", "step_00000002", "step_00000001"]
    with pytest.raises(RecipeError) as e:
        b.clear_checkpoints()  # run.overwrite for b
    assert e.value.key == "checkpoint.dir" and f"the checkpoints of another run ({a.owner})" in e.value.message
    assert len(step_dirs.list_checkpoints(shared)) == 3


# ---------------------------------------------------------------- preemption: was a checkpoint written?


def test_a_checkpoint_written_by_workers_whose_clock_is_behind_counts_as_written(tmp_path):
    from launcher.train.local import checkpoint_since, checkpoints_seen

    directory = tmp_path / "ckpt"
    _save(directory, 40, None)
    before = checkpoints_seen(directory)
    assert checkpoint_since(directory, before) is None  # nothing new
    path = _save(directory, 56, None)
    marker = step_dirs.read_marker(path)
    marker["time"] -= 120  # the workers' clock, 2 minutes behind this process's
    (path / step_dirs.MARKER).write_text(json.dumps(marker))
    assert checkpoint_since(directory, before) == path
    assert checkpoint_since(tmp_path / "none", {}) is None


# ---------------------------------------------------------------- a full or read-only filesystem

_FAULTS = """
import json, subprocess, sys
from pathlib import Path
import torch
from launcher.checkpoint import step_dirs
from launcher.checkpoint.checkpointer import Checkpointer
from launcher.storage import atomic_write

class Big:  # a Stateful whose state (4 MiB) does not fit in the 2 MiB filesystem
    def state_dict(self):
        return {"t": torch.zeros(1 << 20)}

    def load_state_dict(self, state):
        pass

def error_of(write):
    try:
        write()
    except BaseException as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({len(str(e).splitlines())} lines)"
    return "no error"

mount, found = Path(sys.argv[1]), {}
found["ddp"] = error_of(lambda: step_dirs.write_checkpoint(mount / "full", 1, {"w": torch.zeros(1 << 20)}))
found["fsdp"] = error_of(
    lambda: Checkpointer(mount / "full", 1, is_writer=True, sharded=frozenset({"model"})).save(1, {"model": Big()}, {})
)
found["left"] = sorted(p.name for p in (mount / "full").iterdir())
step_dirs.write_checkpoint(mount / "some", 1, {"w": torch.zeros(4)})
(mount / "none").mkdir()
subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
found["read-only, after one"] = error_of(lambda: step_dirs.write_checkpoint(mount / "some", 2, {"w": torch.zeros(4)}))
found["read-only, the first"] = error_of(lambda: step_dirs.write_checkpoint(mount / "none", 1, {"w": torch.zeros(4)}))
found["read-only file"] = error_of(lambda: atomic_write(mount / "startup.json", lambda f: f.write(b"{}")))
from launcher.train.assemble import _write_startup
found["startup report"] = error_of(lambda: _write_startup(mount / "startup.json"))  # a report: it only warns
print(json.dumps(found))
"""


def test_a_full_or_read_only_filesystem_is_one_line_naming_the_path_and_what_is_left(tmp_path):
    """In a 2 MiB tmpfs: torch's own reasons ("unexpected pos", "CheckpointException ranks:...") were
    given for a full disk once the partial checkpoint had been removed; a read-only directory was a
    traceback (the temporary directory was made outside the try), or claimed a previous checkpoint
    that did not exist."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    code = tmp_path / "faults.py"
    code.write_text(_FAULTS)
    script = f"mount -t tmpfs -o size=2m tmpfs {mount} || exit 99; exec {sys.executable} {code} {mount}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=worker_env(), capture_output=True, text=True)
    if proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("ddp", "fsdp"):
        assert found[kind].startswith(f"TrainingError: writing {mount}/full/step_00000001 failed: "), found
        assert f"failed: no space left on {mount}/full (" in found[kind], found
        assert found[kind].endswith(f"; no checkpoint was saved in {mount}/full before it (1 lines)"), found
    assert found["left"] == [], found  # no partial checkpoint
    for kind, directory in (("read-only, after one", "some"), ("read-only, the first", "none")):
        assert found[kind].startswith(
            f"TrainingError: writing {mount}/{directory}/step_0000000{1 + (directory == 'some')} failed: "
            f"Read-only file system in {mount}/{directory} ("
        ), found
    assert found["read-only, after one"].endswith("; the previous checkpoint (step_00000001) is intact (1 lines)")
    assert found["read-only, the first"].endswith(f"; no checkpoint was saved in {mount}/none before it (1 lines)")
    assert found["read-only file"].startswith(f"TrainingError: writing {mount}/startup.json failed: Read-only file")
    assert found["startup report"] == "no error", found
    assert f"writing {mount}/startup.json failed: Read-only file system in {mount} (" in proc.stderr


# ---------------------------------------------------------------- a run directory named as a checkpoint


def test_a_run_directory_names_its_newest_checkpoint_for_resume_and_convert(tmp_path):
    default, elsewhere = tmp_path / "a", tmp_path / "b"
    for step in (1, 2):
        _save(default / "checkpoints", step, None)
    (elsewhere / "ckpt").mkdir(parents=True)
    _save(tmp_path / "shared", 5, None)
    (elsewhere / "config.yaml").write_text(f"checkpoint:\n  dir: {tmp_path / 'shared'}\n")
    assert step_dirs.resolve_resume(str(default), tmp_path / "unused") == default / "checkpoints" / "step_00000002"
    assert step_dirs.resolve_resume(str(elsewhere), tmp_path / "unused") == tmp_path / "shared" / "step_00000005"
    with pytest.raises(RecipeError, match="not a checkpoint"):  # no run's, no checkpoints
        step_dirs.resolve_resume(str(elsewhere / "ckpt"), tmp_path / "unused")
