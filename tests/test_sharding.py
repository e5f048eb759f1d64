"""dist.strategy fsdp/hsdp (FSDP2): the same maths as ddp and as one process, sharded checkpoints
that resume at any world size and under either strategy, and one-line errors.

The recipe is test_equivalence's: 37 samples, micro-batch 4, global batch 16, so windows are
accumulated, the last one of each epoch is partial, and DistributedSampler pads a shard."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import assert_close_rel, finish, launcher, load_weights, recipe_dict, worker_env, write_recipe
from launcher.checkpoint import step_dirs
from launcher.checkpoint.rundir import RunDir
from launcher.cluster.env import ClusterEnv
from launcher.parallel.sharding import MIN_TORCH, torch_version
from launcher.recipe.schema import validate
from launcher.train import assemble
from runs import assert_identical, gate, recipe, start, wait_for

needs_fsdp = pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6 (tested: the error)")


def rows(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def single(tmp_path, name, **changes):
    run_dir = tmp_path / name
    assemble.run(validate(recipe_dict(**{"run.dir": str(run_dir), **changes})), ClusterEnv())
    return run_dir


def ranks(tmp_path, name, nproc=2, **changes):
    run_dir = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", recipe_dict(**{"run.dir": str(run_dir), **changes}))
    proc = launcher("run", "--nproc", str(nproc), path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def assert_same_run(run_dir, reference, rtol=1e-6):
    assert_close_rel(load_weights(run_dir), load_weights(reference), rtol=rtol)
    for key in ("loss", "val_loss", "grad_norm"):  # grad_norm: the norm over every shard
        got, want = rows(run_dir, key), rows(reference, key)
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, rel=rtol), key


CLIP = {"train.grad_clip_norm": 0.05}  # small enough that every step clips


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, micro-batch 16: the plain big-batch run, with clipping by the total norm."""
    return single(tmp_path_factory.mktemp("ref"), "big", **{"data.batch_size": 16, **CLIP})


@needs_fsdp
def test_fsdp_at_world_2_equals_ddp_and_one_process(tmp_path, reference):
    """2 ranks x micro 4 x accumulation 2, a partial last window, clipping across shards."""
    # traced: steps 3 (an epoch's partial last window, one micro-batch) and 4 (two micro-batches)
    profile = {"log.profile": {"start_step": 1, "steps": 2}}
    fsdp = ranks(tmp_path, "fsdp", **{"dist.strategy": "fsdp", **CLIP, **profile})
    assert_same_run(fsdp, reference)
    # gradients are reduced once per optimizer step, after the window's last micro-batch: each unit's
    # reduce-scatter (FSDP's own profiler label) shows up once per traced step, not once per backward
    events = json.loads((fsdp / "profile" / "rank0.trace.json").read_text())["traceEvents"]
    reduces = [e["name"] for e in events if e.get("name", "").startswith("FSDP::post_backward_reduce")]
    assert reduces and all(reduces.count(name) == 2 for name in reduces), sorted(reduces)
    ddp = ranks(tmp_path, "ddp", **CLIP)
    assert_same_run(ddp, reference)
    assert (fsdp / "checkpoints").is_dir() and list((fsdp / "checkpoints").glob("step_*/shards/*.distcp"))
    # what rank 0 holds between steps, measured on its local shards: about half. Rows are split
    # over 2 ranks; the head's one row (16 weights, 1 bias) stays whole on rank 0: 225 of 433
    held = {run: rows(run, "state_mib")[0] * 2**20 for run in (fsdp, ddp)}
    adam_steps = 6 * 4  # AdamW's step count, a scalar tensor per parameter tensor, on every rank
    assert held[ddp] == 3 * 4 * 433 + adam_steps  # fp32 weights and AdamW's two moments
    assert held[fsdp] == 3 * 4 * 225 + adam_steps


@needs_fsdp
def test_hsdp_2x2_equals_one_process(tmp_path, reference):
    run = ranks(tmp_path, "hsdp", nproc=4, **{"dist.strategy": "hsdp", "dist.fsdp.shard_group_size": 2, **CLIP})
    assert_same_run(run, reference)


@needs_fsdp
def test_fsdp_with_checkpoint_sequential_and_unsharded_weights_after_forward(tmp_path, reference):
    run = ranks(
        tmp_path,
        "fsdp_ac",
        **{
            "dist.strategy": "fsdp",
            "dist.fsdp.reshard_after_forward": False,
            "train.activation_checkpointing.segments": 2,
            **CLIP,
        },
    )
    assert_same_run(run, reference)


@needs_fsdp
@pytest.mark.parametrize(
    ("changes", "rtol"),
    [
        ({"dist.fsdp.cpu_offload": True}, 1e-6),
        ({"train.compile": True}, 1e-5),  # inductor may fuse and reorder float operations
    ],
    ids=["cpu_offload", "compile"],
)
def test_fsdp_with_cpu_offload_or_torch_compile_equals_one_process(tmp_path, reference, changes, rtol):
    assert_same_run(ranks(tmp_path, "run", **{"dist.strategy": "fsdp", **CLIP, **changes}), reference, rtol=rtol)


def test_fsdp_on_torch_older_than_2_6_is_one_line(tmp_path):
    if torch_version() >= MIN_TORCH:
        pytest.skip("this torch has FSDP2; the CI's torch 2.4.1 suite runs this test")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), "dist.strategy": "fsdp"}))
    proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: dist.strategy: fsdp needs torch 2.6 or newer (FSDP2's fully_shard); this is torch "
        f"{torch.__version__}: upgrade torch, or use dist.strategy=ddp"
    ]


@needs_fsdp
@pytest.mark.parametrize(
    ("command", "changes", "expected"),
    [
        ("run", {"dist.fsdp.units": ["Blok"]}, "error: dist.fsdp.units: no module of class Blok"),
        ("check", {"dist.fsdp.units": ["Blok"]}, "error: dist.fsdp.units: no module of class Blok"),
        (
            "run",
            {"dist.strategy": "hsdp", "dist.fsdp.shard_group_size": 3},
            "error: dist.fsdp.shard_group_size: 3 does not divide the world size 2",
        ),
    ],
)
def test_sharding_mistakes_are_one_line(tmp_path, command, changes, expected):
    r = recipe_dict(**{"run.dir": str(tmp_path / "run"), "dist.strategy": "fsdp", **changes})
    nproc = ["--nproc", "2"] if "dist.fsdp.shard_group_size" in changes else []  # units: checked at any world size
    proc = launcher(command, *nproc, write_recipe(tmp_path / "r.yaml", r), env=worker_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


# resuming: micro-batch 2 and global batch 24 divide at world sizes 1, 2, 3 and 4 alike; 3 epochs
# of 2 steps (24 samples, then a partial 13), a checkpoint every 2 steps
RESUMABLE = {
    "data.batch_size": 2,
    "train.global_batch_size": 24,
    "train.epochs": 3,
    "checkpoint.every_n_steps": 2,
    "checkpoint.keep_last": 3,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """fsdp at world 2, start to end: its step-2 checkpoint is what the resumes continue."""
    return ranks(tmp_path_factory.mktemp("fsdp"), "whole", **{"dist.strategy": "fsdp", **RESUMABLE})


def resumed(tmp_path, source, name, nproc, strategy):
    """A fresh run directory continuing `source`'s step-2 checkpoint, at `nproc` ranks."""
    step = source / "checkpoints" / "step_00000002"
    assert step.is_dir(), sorted(p.name for p in (source / "checkpoints").iterdir())
    changes = {"dist.strategy": strategy, **RESUMABLE, "checkpoint.resume": str(step)}
    if nproc == 1:
        return single(tmp_path, name, **changes)
    return ranks(tmp_path, name, nproc=nproc, **changes)


@needs_fsdp
def test_a_sharded_checkpoint_resumes_bit_for_bit_at_the_same_world_size(tmp_path, uninterrupted):
    run = resumed(tmp_path, uninterrupted, "again", 2, "fsdp")
    again, whole = load_weights(run), load_weights(uninterrupted)
    assert all(torch.equal(again[k], whole[k]) for k in whole)
    assert rows(run, "loss") == rows(uninterrupted, "loss")[-len(rows(run, "loss")) :]


@needs_fsdp
@pytest.mark.parametrize(("nproc", "strategy"), [(3, "fsdp"), (1, "fsdp"), (4, "ddp")])
def test_a_sharded_checkpoint_resumes_at_another_world_size_and_strategy(tmp_path, uninterrupted, nproc, strategy):
    assert_close_rel(
        load_weights(resumed(tmp_path, uninterrupted, "on", nproc, strategy)), load_weights(uninterrupted), rtol=1e-5
    )


@needs_fsdp
def test_a_ddp_checkpoint_resumes_under_fsdp(tmp_path, uninterrupted):
    ddp = ranks(tmp_path, "ddp", **RESUMABLE)
    assert_close_rel(load_weights(ddp), load_weights(uninterrupted), rtol=1e-5)  # the same maths
    assert_close_rel(load_weights(resumed(tmp_path, ddp, "on", 3, "fsdp")), load_weights(ddp), rtol=1e-5)


# faults: the resumable recipe of test_resume (dropout, noisy data, a schedule), sharded
@pytest.fixture(scope="module")
def gated_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    path = write_recipe(tmp / "ref.yaml", recipe(tmp / "ref", **{"dist.strategy": "fsdp"}))
    proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 0, proc.stderr
    return load_weights(tmp / "ref")


@needs_fsdp
def test_an_elastic_restart_after_sigkill_resumes_fsdp_bit_for_bit(tmp_path, gated_reference):
    _, waiting, model = gate(tmp_path, rank=1, at_call=9, first_attempt_only=True)
    changes = {**model, "dist.strategy": "fsdp", "checkpoint.every_n_steps": 2}
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path / "run", **changes))
    proc = start("run", "--nproc", "2", "--max-restarts", "1", path)
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)  # rank 1 dies mid-step
    out, err = finish(proc, 300)
    assert proc.returncode == 0, err
    assert "restart 1" in out
    assert_identical(load_weights(tmp_path / "run"), gated_reference)


@needs_fsdp
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_ranks_killed_inside_a_sharded_save_leave_the_previous_checkpoint(tmp_path, gated_reference, async_save):
    """LAUNCHER_TEST_CRASH_AT=inside-shards: each rank dies once its shards of step 6 are written,
    inside DCP's save (before its metadata and our marker): exactly there, every time. With
    checkpoint.async_save the save is the background thread's, staged while training went on."""
    run_dir = tmp_path / "run"
    changes = {"dist.strategy": "fsdp", "checkpoint.every_n_steps": 2, "checkpoint.async_save": async_save}
    first = write_recipe(tmp_path / "a.yaml", recipe(run_dir, **changes, **{"train.max_steps": 4}))
    assert launcher("run", "--nproc", "2", first).returncode == 0
    path = write_recipe(tmp_path / "r.yaml", recipe(run_dir, **changes))
    proc = launcher("run", "--nproc", "2", path, env=worker_env(LAUNCHER_TEST_CRASH_AT="inside-shards"))
    assert proc.returncode != 0
    assert "was killed by SIGKILL" in proc.stderr, proc.stderr
    assert list((run_dir / "checkpoints").glob(".step_00000006.*.tmp/shards/*.distcp"))  # it died writing step 6
    assert step_dirs.find_latest(run_dir / "checkpoints").name == "step_00000004"
    proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 0, proc.stderr
    assert_identical(load_weights(run_dir), gated_reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@needs_fsdp
def test_convert_joins_a_sharded_checkpoint_into_the_gathered_model_pt(tmp_path, uninterrupted):
    out = tmp_path / "joined.pt"
    proc = launcher("convert", str(uninterrupted / "checkpoints"), "-o", str(out))  # its newest: the last step
    assert proc.returncode == 0, proc.stderr
    assert_identical(torch.load(out, weights_only=True), load_weights(uninterrupted))
    # and a sharded step directory is the launcher's own: run.overwrite may delete it
    assert RunDir(uninterrupted, uninterrupted / "checkpoints").foreign_checkpoint_entries() == []
    again = launcher("convert", str(uninterrupted / "checkpoints"), "-o", str(out))
    assert again.returncode == 2
    assert (
        again.stderr.strip() == f"error: --output: {out} exists; pass --overwrite to replace it, or name another file"
    )


def test_convert_copies_a_ddp_checkpoints_weights(tmp_path):
    run = ranks(tmp_path, "ddp", **{"train.max_steps": 2})
    out = tmp_path / "model.pt"
    for source in (run / "checkpoints" / "step_00000002", run):  # a run directory: its newest checkpoint
        proc = launcher("convert", str(source), "-o", str(out), "--overwrite")
        assert proc.returncode == 0, proc.stderr
        assert f"from {run / 'checkpoints' / 'step_00000002'}" in proc.stdout, proc.stdout
        assert_identical(torch.load(out, weights_only=True), load_weights(run))


def test_check_prints_each_ranks_memory_under_ddp_and_fsdp_and_warns_when_ddp_cannot_fit(tmp_path):
    """Computed from a meta-device build: a 10-billion-parameter MLP costs nothing to check."""
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    out = launcher("check", "--nproc", "4", path)
    assert out.returncode == 0, out.stderr
    params = 8 * 16 + 16 + 16 * 16 + 16 + 16 + 1  # fp32: 4 bytes each; AdamW: two moments
    assert (
        f"per rank, ddp          {4 * params * 4 / 1024:.3g} KiB (parameters {4 * params / 1024:.3g} KiB" in out.stdout
    )
    assert "per rank, fsdp over 4" in out.stdout
    assert "warning: dist.strategy" not in out.stdout
    huge = launcher("check", "--nproc", "2", path, "model.sizes=[8,100000,100000,1]")
    assert huge.returncode == 0, huge.stderr
    assert (
        "per rank, ddp          149 GiB (parameters 37.3 GiB + gradients 37.3 GiB + optimizer state 74.5 GiB)"
        in huge.stdout
    )
    assert "per rank, fsdp over 2  74.5 GiB" in huge.stdout
    assert "warning: dist.strategy: under ddp each rank keeps 149 GiB" in huge.stdout


@needs_fsdp
def test_meta_init_never_holds_the_whole_model_on_a_rank(tmp_path):
    """A 268 MB model over 4 ranks: with meta_init, building, sharding and initialising it adds
    about a quarter of that to rank 0's peak memory (measured: 70 MiB; built whole: 326 MiB)."""
    wide = {"model.sizes": [8, 8192, 8192, 1], "train.max_steps": 1, "data.val": None, "train.global_batch_size": 16}
    run = ranks(tmp_path, "run", nproc=4, **{"dist.strategy": "fsdp", "dist.fsdp.meta_init": True, **wide})
    model_mib = (8 * 8192 + 8192 + 8192 * 8192 + 8192 + 8192 + 1) * 4 / 2**20
    growth = json.loads((run / "startup.json").read_text())["model_peak_rss_growth_mib"]
    assert growth < 0.5 * model_mib, f"rank 0's peak grew {growth:.0f} MiB for a {model_mib:.0f} MiB model"
    assert rows(run, "loss") and torch.isfinite(torch.tensor(rows(run, "loss"))).all()


@needs_fsdp
def test_resuming_a_sharded_checkpoint_with_another_model_shape_is_one_line(tmp_path, uninterrupted):
    step = uninterrupted / "checkpoints" / "step_00000002"
    r = recipe_dict(
        **{"run.dir": str(tmp_path / "run"), **RESUMABLE, "checkpoint.resume": str(step), "model.sizes": [8, 32, 16, 1]}
    )
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", r))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint.resume: {step} was saved from a different model: shape mismatches")
    assert "(16, 8) vs model (32, 8)" in lines[0]


@needs_fsdp
def test_a_preemption_signal_checkpoints_fsdp_shards_and_the_requeued_run_resumes_bit_for_bit(
    tmp_path, gated_reference
):
    _, waiting, model = gate(tmp_path, rank=0, at_call=7, release_on=["SIGUSR1"])  # mid-way through step 4
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path / "run", **model, **{"dist.strategy": "fsdp"}))
    proc = start("run", "--nproc", "2", path)
    wait_for(waiting, proc)
    proc.send_signal(signal.SIGUSR1)  # as SLURM's --signal=USR1 would, to the launcher
    _, err = finish(proc, 300)
    assert proc.returncode == 75, err
    saved = step_dirs.find_latest(tmp_path / "run" / "checkpoints")
    assert saved is not None and list((saved / "shards").glob("*.distcp"))
    requeued = launcher("run", "--nproc", "2", path)
    assert requeued.returncode == 0, requeued.stderr
    assert_identical(load_weights(tmp_path / "run"), gated_reference)


@needs_fsdp
def test_a_non_finite_step_is_skipped_on_every_rank_under_fsdp_as_under_ddp(tmp_path):
    """rank 1's loss is NaN at its 5th forward: the norm over all shards is NaN on both ranks."""
    nan = {"model": {"_component_": "testkit.NaNOnRank", "sizes": [8, 16, 1], "rank": 1, "at_call": 5}}
    runs = {s: ranks(tmp_path, s, **{**nan, "dist.strategy": s, "train.on_nonfinite": "skip"}) for s in ("fsdp", "ddp")}
    assert rows(runs["fsdp"], "skipped_steps")[-1] == rows(runs["ddp"], "skipped_steps")[-1] == 1
    # without clipping, the logged norm is launcher.parallel.gradients' (local shards, one all-reduce per mesh)
    got, want = rows(runs["fsdp"], "grad_norm"), rows(runs["ddp"], "grad_norm")
    assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-6, nan_ok=True)
    assert_close_rel(load_weights(runs["fsdp"]), load_weights(runs["ddp"]), rtol=1e-6)


@needs_fsdp
def test_fp16_under_fsdp_scales_and_skips_as_under_ddp(tmp_path):
    """fp16 with a GradScaler over sharded gradients: the same overflow skips and final scale as
    ddp's (65536 backs off to 8192 in the first steps here), and the same weights to fp16's
    tolerance (FSDP casts the weights, ddp's autocast casts each operator's inputs)."""
    fp16 = {"train.precision": "fp16"}
    runs = {s: ranks(tmp_path, s, **{**fp16, "dist.strategy": s}) for s in ("fsdp", "ddp")}
    scales = {
        s: step_dirs.load(step_dirs.find_latest(run / "checkpoints"))["scaler"]["scale"] for s, run in runs.items()
    }
    assert scales["fsdp"] == scales["ddp"] < 65536.0
    assert_close_rel(load_weights(runs["fsdp"]), load_weights(runs["ddp"]), rtol=1e-4)


@needs_fsdp
def test_a_run_continued_on_4_then_3_then_1_ranks_reaches_the_uninterrupted_weights(tmp_path, uninterrupted):
    """As after losing nodes: step 2 of the 2-rank run continues on 4 ranks to step 4, that one on 3
    ranks to step 5, that one in one process to the end (6), each from the previous one's checkpoint."""
    run = tmp_path / "run"
    start_from = uninterrupted / "checkpoints" / "step_00000002"
    for nproc, until in ((4, 4), (3, 5), (1, 6)):
        changes = {"dist.strategy": "fsdp", **RESUMABLE, "checkpoint.resume": str(start_from), "train.max_steps": until}
        path = write_recipe(tmp_path / f"w{nproc}.yaml", recipe_dict(**{"run.dir": str(run), **changes}))
        proc = launcher("run", *(["--nproc", str(nproc)] if nproc > 1 else []), path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        start_from = step_dirs.find_latest(run / "checkpoints")
        assert start_from.name == f"step_{until:08d}"
    assert_close_rel(load_weights(run), load_weights(uninterrupted), rtol=1e-5)


@needs_fsdp
def test_early_stopping_under_fsdp_stops_both_ranks_where_ddp_stops(tmp_path):
    """Every rank evaluates (the sharded model needs all of them) and all stop at the same step."""
    es = {"train.epochs": 20, "train.eval_every_steps": 1}
    es["train.early_stopping"] = {"metric": "val_loss", "patience": 2, "min_delta": 1e9}
    runs = {s: ranks(tmp_path, s, **{**es, "dist.strategy": s}) for s in ("fsdp", "ddp")}
    for run in runs.values():
        assert [
            r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r
        ] == [1, 2, 3]
        state = step_dirs.load(step_dirs.find_latest(run / "checkpoints"))["train_state"]
        assert state["step"] == 3 and state["stop_reason"].startswith("early stopping"), state
    assert rows(runs["fsdp"], "val_loss") == pytest.approx(rows(runs["ddp"], "val_loss"), rel=1e-6)
    assert_close_rel(load_weights(runs["fsdp"]), load_weights(runs["ddp"]), rtol=1e-6)


# ---------------------------------------------------------------- damaged and crafted sharded checkpoints


class _Pwn:
    """Unpickled, it would create a file: what a crafted .metadata could do with plain pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _copy_checkpoints(uninterrupted, tmp_path):
    import shutil

    copy = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", copy)
    return copy


def _rewrite_marker_for(step_dir, name):
    """What an attacker rewriting COMPLETE too would do: the marker then agrees with the file."""
    from launcher.storage import sha256_of

    marker = json.loads((step_dir / "COMPLETE").read_text())
    marker["shards"][name] = (step_dir / name).stat().st_size
    marker["shard_sha256"][name] = sha256_of(step_dir / name)
    (step_dir / "COMPLETE").write_text(json.dumps(marker))


@needs_fsdp
def test_a_crafted_metadata_file_runs_no_code_on_resume_or_convert(tmp_path, uninterrupted):
    import pickle

    copy = _copy_checkpoints(uninterrupted, tmp_path)
    step = copy / "step_00000004"
    pwned = tmp_path / "pwned"
    (step / "shards" / ".metadata").write_bytes(pickle.dumps(_Pwn(pwned)))
    _rewrite_marker_for(step, "shards/.metadata")
    proc = launcher("convert", str(step), "-o", str(tmp_path / "m.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "is not DCP metadata" in proc.stderr.strip().splitlines()[-1] and "system" in proc.stderr
    changes = {"dist.strategy": "fsdp", **RESUMABLE, "checkpoint.resume": str(step), "run.dir": str(tmp_path / "r")}
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**changes))
    proc = launcher("run", "--nproc", "2", path)
    assert proc.returncode == 2 and "is not DCP metadata" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not pwned.exists()


@needs_fsdp
@pytest.mark.parametrize("target", ["shard", "metadata"])
def test_a_flipped_byte_is_found_and_the_checkpoint_skipped_like_a_truncated_one(tmp_path, uninterrupted, target):
    copy = _copy_checkpoints(uninterrupted, tmp_path)
    latest = step_dirs.find_latest(copy)
    shards = latest / "shards"
    victim = shards / ".metadata" if target == "metadata" else sorted(shards.glob("*.distcp"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, the size kept
    victim.write_bytes(bytes(data))
    assert "is corrupt (sha256 differs" in step_dirs.verify(latest)
    assert step_dirs.find_latest(copy, warn=False) != latest  # the one before it is the resume point
    proc = launcher("convert", str(latest), "-o", str(tmp_path / "m.pt"))
    assert proc.returncode == 2 and "is corrupt" in proc.stderr.strip().splitlines()[-1], proc.stderr
    # the 2 ranks of a job hash half the files each: one of them finds the damage, and both skip
    # the checkpoint (were it rank 0's verdict alone, they would resume from different steps)
    assert [bool(step_dirs.verify(latest, (index, 2))) for index in (0, 1)].count(True) == 1
    again = tmp_path / "again"
    again.mkdir()
    copy.rename(again / "checkpoints")
    ranks(tmp_path, "again", **{"dist.strategy": "fsdp", **RESUMABLE})
    reference = load_weights(uninterrupted)
    assert all(torch.equal(v, reference[k]) for k, v in load_weights(again).items())  # bit for bit


@needs_fsdp
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_a_sharded_save_is_one_line_and_leaves_no_partial(tmp_path, async_save):
    """With checkpoint.async_save the failed write is the background thread's, reported at the next save."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small filesystem")
    mount = tmp_path / "small"
    mount.mkdir()
    changes = {"dist.strategy": "fsdp", "checkpoint.dir": str(mount / "ckpt"), "checkpoint.every_n_steps": 1}
    changes |= {"checkpoint.keep_last": 9, "model.sizes": [8, 256, 1], "run.dir": str(tmp_path / "run")}
    changes |= {"checkpoint.async_save": async_save}
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**changes))  # ~20 KB of shards a step: 96 KB holds few
    script = (
        f"mount -t tmpfs -o size=96k tmpfs {mount} || exit 99; "
        f"{sys.executable} -m launcher run --nproc 2 {path}; code=$?; ls -a {mount}/ckpt > {tmp_path}/left.txt; "
        f"exit $code"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=worker_env(), capture_output=True, text=True)
    if proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"writing {mount / 'ckpt'}/step_" in line and f"no space left on {mount / 'ckpt'}" in line, line
    left = (tmp_path / "left.txt").read_text().split()
    steps = sorted(n for n in left if n.startswith("step_"))
    # which checkpoint is left, truly: the newest, or none (it once claimed one that did not exist)
    kept = (
        f"the previous checkpoint ({steps[-1]}) is intact" if steps else f"no checkpoint was saved in {mount / 'ckpt'}"
    )
    assert "MiB free there" in line and kept in line, line
    assert not [n for n in left if n.endswith(".tmp")]


@needs_fsdp
def test_convert_of_auto_none_or_a_partial_checkpoint_is_one_line(tmp_path, uninterrupted):
    for arg in ("auto", "none"):
        proc = launcher("convert", arg, "-o", str(tmp_path / "m.pt"))
        assert proc.returncode == 2 and proc.stderr.startswith("error: CHECKPOINT:"), proc.stderr
    copy = _copy_checkpoints(uninterrupted, tmp_path)
    latest = step_dirs.find_latest(copy)
    (latest / "COMPLETE").unlink()  # a write that never finished
    proc = launcher("convert", str(latest), "-o", str(tmp_path / "m.pt"))
    assert proc.returncode == 2 and "incomplete" in proc.stderr.strip().splitlines()[-1], proc.stderr
