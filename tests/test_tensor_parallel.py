"""Tensor parallelism (issue #22): the built-in GPT split over tensor-parallel ranks, composed with
ddp and fsdp on one device mesh, equals one process with the same global batch (SGD with momentum,
clipping on, fp32, no dropout), and its DCP checkpoints resume under other layouts. Real processes,
gloo, DTensor on CPU."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import ROOT, assert_close_rel, finish, launcher, load_weights
from launcher.parallel.sharding import MIN_TORCH, torch_version
from testkit import SGD_4_STEPS, gpt_bytes

pytestmark = pytest.mark.skipif(torch_version() < MIN_TORCH, reason="DTensor tensor parallelism needs torch >= 2.6")

# a 2-layer GPT with 4 heads (splits over 2 and 4 ranks), 4 steps of a global batch of 16 sequences
TINY = [*gpt_bytes(2), *SGD_4_STEPS]


def run(run_dir, *changes, nproc=None):
    args = ["run", *(["--nproc", str(nproc)] if nproc else []), ROOT / "recipes" / "gpt.yaml"]
    proc = launcher(*args, f"run.dir={run_dir}", *TINY, *changes, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a correct layout alarms nobody (DTensor warned on every rank at each gradient norm under fsdp x tp)
    assert "inconsistent results between ranks" not in proc.stderr, proc.stderr[-3000:]
    return run_dir


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]


def assert_equal_to(run_dir, reference):
    assert_close_rel(load_weights(run_dir), load_weights(reference), rtol=1e-5)
    for (loss, norm), (loss_ref, norm_ref) in zip(rows(run_dir), rows(reference), strict=True):
        assert loss == pytest.approx(loss_ref, rel=1e-5) and norm == pytest.approx(norm_ref, rel=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The whole global batch in one micro-batch of one process."""
    return run(tmp_path_factory.mktemp("tp") / "one", "data.batch_size=16")


@pytest.fixture(scope="module")
def fsdp_x_tp(tmp_path_factory):
    """4 ranks as fsdp 2 x tp 2, checkpointed at steps 2 and 4."""
    return run(tmp_path_factory.mktemp("tp") / "fsdp-tp", "dist.strategy=fsdp", "dist.tensor_parallel=2", nproc=4)


def test_fsdp_2_x_tp_2_equals_one_process(fsdp_x_tp, one_process):
    assert_equal_to(fsdp_x_tp, one_process)


@pytest.mark.parametrize(
    "name,changes",
    [
        ("ddp-tp", ["dist.strategy=ddp", "dist.tensor_parallel=2"]),
        ("tp4", ["dist.strategy=fsdp", "dist.tensor_parallel=4"]),
    ],
)
def test_other_layouts_of_4_ranks_equal_one_process(tmp_path, one_process, name, changes):
    assert_equal_to(run(tmp_path / name, *changes, nproc=4), one_process)


@pytest.mark.parametrize(
    "nproc,changes",
    [
        (2, ["dist.strategy=fsdp", "dist.tensor_parallel=1"]),  # dp 2 x tp 1
        (2, ["dist.strategy=fsdp", "dist.tensor_parallel=2"]),  # tp 2 only
        (None, ["dist.strategy=ddp", "dist.tensor_parallel=1"]),  # one process
    ],
    ids=["dp2", "tp2", "one-process"],
)
def test_an_fsdp_x_tp_checkpoint_resumes_under_another_layout(tmp_path, fsdp_x_tp, nproc, changes):
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_x_tp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # as if the run had stopped after step 2
    (resumed / "model.pt").unlink()
    run(resumed, *changes, nproc=nproc)
    assert_close_rel(load_weights(resumed), load_weights(fsdp_x_tp), rtol=1e-5)


def test_meta_init_under_fsdp_x_tp_resumes_a_one_process_checkpoint_exactly(tmp_path, one_process):
    """dist.fsdp.meta_init with tensor parallelism: the GPT is built on the meta device, split, sharded
    and given real shards, then each rank loads its pieces of the one process's step-2 checkpoint;
    steps 3 and 4 then equal the one process's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(one_process, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "model.pt").unlink()
    changes = ["dist.strategy=fsdp", "dist.tensor_parallel=2", "dist.fsdp.meta_init=true"]
    run(resumed, *changes, nproc=4)
    assert_close_rel(load_weights(resumed), load_weights(one_process), rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        ["dist.strategy=fsdp", "dist.tensor_parallel=2"],
        ["dist.strategy=hsdp", "dist.fsdp.shard_group_size=2", "dist.tensor_parallel=1"],
    ],
    ids=["fsdp2-x-tp2", "hsdp-2-replicas-x-2-shards"],
)
def test_a_fresh_meta_init_keeps_the_copies_of_each_piece_equal(tmp_path, changes):
    """Ranks that hold copies of one piece (hsdp's replicas; a tensor-parallel group's copies of what
    the plan does not split: embeddings, norms) must hold one value, but meta_init draws each rank's
    own. Copies that differ would be several models trained at once. A checkpoint holds one copy:
    continued from step 2 in one process, the run must end where the 4 ranks did."""
    meta = run(tmp_path / "meta", *changes, "dist.fsdp.meta_init=true", nproc=4)
    resumed = tmp_path / "resumed"
    shutil.copytree(meta, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "model.pt").unlink()
    run(resumed, "data.batch_size=16")
    assert_close_rel(load_weights(resumed), load_weights(meta), rtol=1e-5)


def test_debug_simulates_a_tensor_parallel_layout_by_its_data_parallel_arithmetic(tmp_path, one_process):
    """`launcher debug --simulate-world-size 4` of fsdp 2 x tp 2: one process trains the 2
    data-parallel ranks' micro-batches (tensor parallelism changes no arithmetic) and ends where the
    one process did; it failed on a sampler rank out of range."""
    args = ["debug", ROOT / "recipes" / "gpt.yaml", "--simulate-world-size", "4", "--steps", "4"]
    proc = launcher(*args, f"run.dir={tmp_path}", *TINY, "dist.strategy=fsdp", "dist.tensor_parallel=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_rel(load_weights(tmp_path / "debug"), load_weights(one_process), rtol=1e-5)


def test_debug_distributed_under_tensor_parallelism_runs_without_anomaly_detection(tmp_path):
    """DTensor has no sharding rule for autograd anomaly mode's NaN check: debug says it is off."""
    args = ["debug", ROOT / "recipes" / "gpt.yaml", "--distributed", "--steps", "2"]
    proc = launcher(*args, f"run.dir={tmp_path}", *TINY, "dist.strategy=fsdp", "dist.tensor_parallel=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "anomaly detection is off under tensor parallelism" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "changes,expected",
    [
        (["dist.tensor_parallel=3"], "dist.tensor_parallel: 3 does not divide the world size 4; use a divisor of 4"),
        (
            ["dist.tensor_parallel=4", "model.n_heads=2"],
            "dist.tensor_parallel: model.n_heads is 2, which does not split",
        ),
        (
            # a column-wise split whose output nothing reads split: a shape error at the first step before
            ["dist.tensor_parallel=2", "dist.tp_plan={'*.mlp.0': colwise}"],
            "dist.tp_plan: 1.mlp.0 is split colwise but no module beside it is split rowwise",
        ),
        (
            # the styles inverted: each has its pair beside it, but the row-wise layer reads a whole input
            ["dist.tensor_parallel=2", "dist.tp_plan={'*.mlp.0': rowwise, '*.mlp.2': colwise}"],
            "dist.tp_plan: 1.mlp.0 (by '*.mlp.0') is split rowwise but no column-wise layer before it in 1.mlp "
            "splits its input",
        ),
        (
            # v split by heads, q and k whole: attention meets them before the row-wise proj joins the split
            ["dist.tensor_parallel=2", "dist.tp_plan={'*.v': colwise, '*.proj': rowwise}"],
            "dist.tp_plan: 1.q is left whole but reads the same input as 1.v (split colwise by '*.v') before "
            "1.proj (rowwise) joins the split",
        ),
        (
            ["dist.tensor_parallel=2", "dist.tp_plan={'*.nothing': colwise}"],
            "dist.tp_plan: no module of GPTModel matches the tensor-parallel plan",
        ),
    ],
)
def test_bad_layouts_are_one_line_at_check(changes, expected):
    proc = launcher("check", ROOT / "recipes" / "gpt.yaml", "--nproc", "4", *TINY, *changes)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: {expected}"), proc.stderr[-2000:]


def test_a_model_without_a_plan_is_one_line():
    proc = launcher("check", ROOT / "recipes" / "quickstart.yaml", "--nproc", "2", "dist.tensor_parallel=2")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "dist.tensor_parallel: Sequential has no tensor-parallel plan" in last, last


def test_a_transformers_model_without_a_plan_is_one_line_naming_it(tmp_path):
    """transformers models all have a `tp_plan`, empty where the model has none (GPT-2): that is no plan."""
    from conftest import write_recipe
    from hfkit import lm_recipe

    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path, tmp_path / "run"))
    proc = launcher("check", recipe, "--nproc", "2", "dist.tensor_parallel=2")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "dist.tensor_parallel: GPT2LMHeadModel has no tensor-parallel plan" in last, last
    # and no advice to write one: GPT-2's layers are Conv1D, which no plan can split
    assert "Conv1D, which tensor parallelism cannot split" in last and "give one as dist.tp_plan" not in last, last


def test_check_prints_the_mesh_and_the_memory_per_rank_of_the_layout():
    args = ["--nproc", "8", "dist.strategy=hsdp", "dist.tensor_parallel=2", "dist.fsdp.shard_group_size=2"]
    out = launcher("check", ROOT / "recipes" / "gpt.yaml", *TINY, *args, check=True).stdout
    assert re.search(r"^mesh +8 ranks = 2 replicate x 2 shard x 2 tensor$", out, re.M), out
    assert re.search(r"^per rank, hsdp 2 x 2 x tp 2 +\d", out, re.M), out


def test_convert_joins_an_fsdp_x_tp_checkpoint_into_model_pt(tmp_path, fsdp_x_tp):
    out = tmp_path / "joined.pt"
    launcher("convert", fsdp_x_tp / "checkpoints" / "step_00000004", "-o", out, check=True)
    joined = torch.load(out, weights_only=True)
    assert_close_rel(joined, load_weights(fsdp_x_tp), rtol=0.0)
    # launcher export of the run directory: the built-in GPT is no transformers model, so OUT/model.pt
    launcher("export", fsdp_x_tp, tmp_path / "exported", check=True)
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["model.pt"]
    assert_close_rel(load_weights(tmp_path / "exported"), load_weights(fsdp_x_tp), rtol=0.0)


def test_a_tensor_parallel_group_across_nodes_is_warned_about():
    from launcher.parallel.dims import ParallelDims, node_warning

    assert node_warning(ParallelDims(dp_shard=2, tp=4), local_world_size=8) is None
    warning = node_warning(ParallelDims(dp_shard=3, tp=4), local_world_size=6)
    assert warning is not None and "some tensor-parallel groups span nodes" in warning


def test_a_transformers_llama_split_by_its_base_model_tp_plan_equals_one_process(tmp_path):
    """A 2-layer Llama (4 query heads, 2 key/value heads) by its config's base_model_tp_plan, fsdp 2
    x tp 2, on padded documents with the model's own token-exact loss; and its checkpoint of step 2
    continued in one process."""
    from conftest import changed, write_recipe
    from hfkit import assert_same_export, lm_recipe

    config = {"_component_": "transformers.LlamaConfig", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
    config |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    config |= {"max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}
    recipe = changed(
        lm_recipe(tmp_path, tmp_path / "unused"),
        **{
            "model.config": config,
            "train": {"max_steps": 3, "global_batch_size": 16, "grad_clip_norm": 1.0},
            "checkpoint": {"every_n_steps": 2, "keep_last": 5},
        },
    )
    runs = {}
    for name, nproc, changes in (
        ("one", None, ["data.batch_size=16"]),
        ("tp", 4, ["dist.strategy=fsdp", "dist.tensor_parallel=2"]),
    ):
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        args = ["run", *(["--nproc", str(nproc)] if nproc else []), path, f"run.dir={tmp_path / name}", *changes]
        proc = launcher(*args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / name
    assert_equal_to(runs["tp"], runs["one"])
    # launcher export of the fsdp x tp run: its own hf/, from the checkpoint's joined shards
    launcher("export", runs["tp"], tmp_path / "exported", check=True)
    assert_same_export(tmp_path / "exported", runs["tp"] / "hf")
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["tp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")
    (resumed / "model.pt").unlink()
    proc = launcher("run", tmp_path / "one.yaml", f"run.dir={resumed}", timeout=600)
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stderr[-3000:]
    assert_close_rel(load_weights(resumed), load_weights(runs["tp"]), rtol=1e-5)


def test_an_elastic_restart_after_sigkill_under_fsdp_x_tp_ends_bit_identical(tmp_path):
    """The resumable recipe's MLP (dropout, noisy data, a schedule) split by a recipe plan, 4 ranks as
    fsdp 2 x tp 2: rank 1 killed mid-step, restarted by torchrun's agent from the last checkpoint."""
    import os
    import signal

    from conftest import write_recipe
    from runs import assert_identical, gate, recipe, start, wait_for

    layout = {
        "dist.strategy": "fsdp",
        "dist.tensor_parallel": 2,
        "dist.tp_plan": {"net.1": "colwise", "net.4": "rowwise"},
    }
    reference = write_recipe(tmp_path / "ref.yaml", recipe(tmp_path / "ref", **layout))
    launcher("run", "--nproc", "4", reference, check=True)
    _, waiting, model = gate(tmp_path, rank=1, at_call=9, first_attempt_only=True)
    path = write_recipe(
        tmp_path / "r.yaml", recipe(tmp_path / "run", **layout, **model, **{"checkpoint.every_n_steps": 2})
    )
    proc = start("run", "--nproc", "4", "--max-restarts", "1", path)
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)  # rank 1 dies mid-step
    out, err = finish(proc, 300)
    assert proc.returncode == 0, err
    assert "restart 1" in out
    assert_identical(load_weights(tmp_path / "run"), load_weights(tmp_path / "ref"))
