"""The directories a run writes, function by function: the locks that keep two runs out of each
other's run.dir and checkpoint.dir, checkpoints that name the run that wrote them, and the
preemption report that compares the checkpoints on disk, not clocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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
