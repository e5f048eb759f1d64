"""The end of a run: every rank leaves together, and a rank that never comes does not hang the job.

Issue #37: a 2-rank test hung once at the end of a run, after training, until its timeout, on torch
2.4.1. A process group was destroyed on each rank as soon as that rank was done, whoever else was
still working; and a rank stuck after its work kept the whole job waiting, since the launcher (and
torchrun, and SLURM) wait for every rank."""

from __future__ import annotations

import uuid

from conftest import launcher, recipe_dict, worker_env, write_recipe
from runs import processes_with


def test_a_rank_stuck_after_training_is_named_at_teardown_and_the_job_ends(tmp_path):
    """Rank 1 parks after its last step (in its model's finalizer, which never returns). Rank 0 waits
    for it at the end for dist.timeout_s, names it in one line, and fails, so that the launcher stops
    rank 1: the job ends, exit 1, with no process left. Before, rank 0 closed its process group and
    exited 0, and the job waited on rank 1 for ever."""
    until, waiting, marker = tmp_path / "never", tmp_path / "waiting", f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    model = {"_component_": "testkit.StuckAtExit", "sizes": [8, 16, 1], "rank": 1, "until": str(until)}
    recipe = recipe_dict(
        **{"run.dir": str(tmp_path / "run"), "model": {**model, "waiting": str(waiting)}, "dist.timeout_s": 20}
    )
    proc = launcher("run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", recipe), env=worker_env(**{marker: "1"}))
    assert waiting.exists(), proc.stderr  # rank 1 really was parked after training
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank(s) 1 did not reach the end of the run within dist.timeout_s=20s"), last
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "model.pt").exists()  # rank 0's work was done and written
    assert processes_with(marker) == []
