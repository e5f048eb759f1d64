"""The hang report (issue #35): when a collective times out, every rank writes its Python stacks and
its last collectives under run.dir/hang/, and the parent's last lines on stderr say which rank is
behind and where, or that the ranks wait in different collectives. SIGUSR2 to the parent asks for
the same report while the run goes on.

Slow by nature (a timeout, then the agent's stop of a stuck rank): one run per case."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

from conftest import finish, recipe_dict, worker_env, write_recipe
from launcher.cluster import trail
from launcher.parallel.sharding import MIN_TORCH, torch_version
from runs import processes_with, start, wait_for

TIMEOUT_S = 5  # dist.timeout_s: long enough that a loaded machine's start-up does not time out (others use 3)


def _start(tmp_path: Path, marker: str, timeout_s: float = TIMEOUT_S, **changes):
    recipe = recipe_dict(**{"run.dir": str(tmp_path / "run"), "dist.timeout_s": timeout_s, **changes})
    return start("run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", recipe), env=worker_env(**{marker: "1"}))


def _sleeper(tmp_path: Path) -> dict:
    """Rank 1's dataset sleeps in its 10th fetch (in the first window) until `release` exists."""
    until, waiting = tmp_path / "release", tmp_path / "waiting"
    data = {"_component_": "testkit.SleepsOnRank", "size": 37, "rank": 1, "at_fetch": 10}
    return {"data.train": {**data, "until": str(until), "waiting": str(waiting)}}


def _verdict(stderr: str) -> list[str]:
    """The verdict: the lines from 'hang report' to the end of stderr (it must be the last)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("hang report")]
    assert starts, stderr
    return lines[starts[-1] :]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


TESTKIT = Path(__file__).parent / "support" / "testkit.py"


def test_a_rank_asleep_in_its_dataset_is_named_with_its_line(tmp_path):
    """Rank 1 sleeps in the user's dataset; rank 0's collective times out. Both ranks' reports are
    written, and the verdict, last on stderr, names rank 1 and the dataset's line."""
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    proc = _start(tmp_path, marker, **_sleeper(tmp_path))
    _, err = finish(proc, 240)
    assert proc.returncode == 1, err
    sleeps = _line_of(TESTKIT, "while not Path(self.until).exists():  # SleepsOnRank")
    verdict = _verdict(err)
    assert f"rank 1: not in a collective, at tests/support/testkit.py:{sleeps + 1} in __getitem__" in verdict[2]
    assert verdict[1].startswith("  rank 0: timed out"), verdict
    assert verdict[-1].startswith(
        f"  behind: rank 1 (at tests/support/testkit.py:{sleeps + 1} in __getitem__); the others wait for it"
    ), verdict
    hang = tmp_path / "run" / "hang"
    assert "in __getitem__" in (hang / "rank1.stacks.txt").read_text()  # the report itself
    assert "timed out: " in (hang / "rank0.stacks.txt").read_text()
    assert (hang / "rank0.collectives.txt").exists() and (hang / "rank1.collectives.txt").exists()
    assert processes_with(marker) == []


def test_ranks_in_different_collectives_are_a_mismatch(tmp_path):
    """Rank 1 makes a collective rank 0 skips (on a group of its own): both time out, in different
    collectives, and the verdict says so, naming rank 1's collective and the line that made it."""
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    model = {"_component_": "testkit.ExtraCollective", "sizes": [8, 16, 1], "rank": 1, "timeout_s": TIMEOUT_S}
    proc = _start(tmp_path, marker, model=model)
    _, err = finish(proc, 240)
    assert proc.returncode == 1, err
    extra = _line_of(TESTKIT, "dist.all_reduce(torch.zeros(1), group=self.side)")
    verdict = _verdict(err)
    assert verdict[-1].startswith("  the ranks wait in different collectives (a mismatch): rank 0 in "), verdict
    assert "rank 1 in all_reduce #1 on group " in verdict[-1], verdict
    assert verdict[-1].endswith(f"called at tests/support/testkit.py:{extra} in forward"), verdict
    assert processes_with(marker) == []


def test_a_stopped_rank_is_named_as_stopped(tmp_path):
    """Rank 1 is stopped (SIGSTOP) mid-step: it cannot write a report, and the verdict says that it
    is stopped, behind the others, and where its last collective was called."""
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    until, waiting = tmp_path / "release", tmp_path / "waiting"
    model = {"_component_": "testkit.GatedMLP", "sizes": [8, 16, 1], "rank": 1, "at_call": 3}
    proc = _start(tmp_path, marker, model={**model, "until": str(until), "waiting": str(waiting)})
    pid = None
    try:
        wait_for(waiting, proc)
        pid = int(waiting.read_text())
        os.kill(pid, signal.SIGSTOP)
        _, err = finish(proc, 240)
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 1, err
    verdict = _verdict(err)
    assert verdict[2].startswith("  rank 1: stopped (SIGSTOP or SIGTSTP): it cannot answer; its last collective: ")
    assert verdict[-1].startswith("  behind: rank 1 (stopped); the others wait for it"), verdict
    assert processes_with(marker) == []


def test_sigusr2_to_the_parent_reports_and_the_run_goes_on(tmp_path):
    """SIGUSR2 to `launcher run --nproc` while rank 1 sleeps in its dataset: every rank writes its
    report, the parent prints the verdict (and keeps it in hang/verdict.txt), and the run, released,
    ends well. Under FSDP (torch >= 2.6), whose collectives torch calls from Python, the trail holds
    its all-gathers, each with the launcher's line that led to it (not torch's)."""
    marker = f"LAUNCHER_TEST_{uuid.uuid4().hex}"
    strategy = "fsdp" if torch_version() >= MIN_TORCH else "ddp"
    proc = _start(tmp_path, marker, timeout_s=600, **{"dist.strategy": strategy}, **_sleeper(tmp_path))
    hang = tmp_path / "run" / "hang"
    wait_for(tmp_path / "waiting", proc)
    os.kill(proc.pid, signal.SIGUSR2)
    wait_for(hang / "verdict.txt", proc)
    (tmp_path / "release").touch()
    _, err = finish(proc, 240)
    assert proc.returncode == 0, err
    sleeps = _line_of(TESTKIT, "while not Path(self.until).exists():  # SleepsOnRank")
    assert f"  rank 1: not in a collective, at tests/support/testkit.py:{sleeps + 1} in __getitem__" in err
    assert "in __getitem__" in (hang / "rank1.stacks.txt").read_text()
    assert "in __getitem__" in (hang / "verdict.txt").read_text()
    if strategy == "fsdp":
        fsdp_ops = ("all_gather_single", "all_gather_into_tensor")  # newer torch, older torch
        gathers = [e for e in trail.read(hang / "rank0.collectives.txt").entries if e.op in fsdp_ops]
        launcher = str(Path(trail.__file__).parent.parent) + os.sep
        assert gathers and all(e.at.startswith(launcher) for e in gathers), gathers  # the caller, not torch
    assert processes_with(marker) == []


def test_the_trail_keeps_the_last_collectives_and_their_callers(tmp_path):
    """The ring: 40 collectives leave the last 32, oldest first, each with its group's sequence
    number, its shapes, its state and the line that called it, readable from the file alone."""
    import torch

    t = trail.Trail(tmp_path / "rank0.collectives.txt", 0)
    for _ in range(40):
        t.leave(t.enter("all_reduce", None, torch.zeros(2, 3)), "done")  # the call site
    t.enter("broadcast", None, [torch.zeros(4, dtype=torch.int64)])
    t.close()
    recorded = trail.read(tmp_path / "rank0.collectives.txt")
    assert recorded.pid == os.getpid()
    assert [e.seq for e in recorded.entries] == list(range(10, 42))
    last = recorded.entries[-1]
    assert (last.op, last.group, last.shapes, last.state) == ("broadcast", "world", "1 x int64[4]", "in")
    assert recorded.current == last
    line = _line_of(Path(__file__), "# the call site")
    first = recorded.entries[0]
    assert (first.at, first.state) == (f"{__file__}:{line}", "done")
    assert first.fn == "test_the_trail_keeps_the_last_collectives_and_their_callers"


def test_a_rank_writes_its_stacks_on_sigusr2_and_a_late_one_does_not_kill_it(tmp_path):
    """Armed: SIGUSR2 writes every thread's stack (faulthandler, from its signal handler). Disarmed
    (the run is over, the report kept): a late SIGUSR2 from the parent is ignored, not fatal."""
    from launcher.cluster import hang

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        armed = hang.Armed(tmp_path / "hang", 3, on_signal=True)
        os.kill(os.getpid(), signal.SIGUSR2)
        armed.disarm()
        os.kill(os.getpid(), signal.SIGUSR2)  # this process lives on
        stacks = (tmp_path / "hang" / "rank3.stacks.txt").read_text()
        assert "in test_a_rank_writes_its_stacks_on_sigusr2_and_a_late_one_does_not_kill_it" in stacks
        assert (tmp_path / "hang" / "rank3.collectives.txt").exists()  # kept beside the report
    finally:
        signal.signal(signal.SIGUSR2, previous)
