"""Pipeline parallelism through the launcher (issue #32): the built-in GPT (tiny, fp32, SGD with
momentum, clipping on, no dropout) split into stages under torch's schedules, alone and with fsdp,
equals one process with the same global batch (the logged loss and gradient norm, the validation
loss and the weights, to 1e-5), its checkpoints resume at other layouts, and a transformers Llama
at pp 2 equals its one process too. Real processes, gloo. pp 2 x fsdp 2 x tp 2 is in
bench/pp_layouts.py (8 ranks: too many for CI's 2 cores)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import ROOT, assert_close_rel, launcher, load_weights
from launcher.errors import RecipeError
from launcher.parallel.pipeline import PIPELINE_TORCH, torch_version
from testkit import SGD_4_STEPS, gpt_bytes

pytestmark = pytest.mark.skipif(torch_version() < PIPELINE_TORCH, reason="pipeline schedules need torch >= 2.8")

# a 4-block GPT (2 stages per rank for interleaving), 4 steps of 16 sequences in micro-batches of 4
TINY = [*gpt_bytes(4), *SGD_4_STEPS]


def run(run_dir, *changes, nproc=None, recipe="gpt.yaml", tiny=TINY):
    args = ["run", *(["--nproc", str(nproc)] if nproc else []), ROOT / "recipes" / recipe]
    proc = launcher(*args, f"run.dir={run_dir}", *tiny, *changes, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r or "val_loss" in r]


def assert_equal_to(run_dir, reference):
    assert_close_rel(load_weights(run_dir), load_weights(reference), rtol=1e-5)
    got, want = rows(run_dir), rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for r, ref in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in ref:
                assert r[key] == pytest.approx(ref[key], rel=1e-5), (key, r["step"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The whole global batch in one micro-batch of one process."""
    return run(tmp_path_factory.mktemp("pp") / "one", "data.batch_size=16")


@pytest.fixture(scope="module")
def pp_x_fsdp(tmp_path_factory):
    """4 ranks as pp 2 x fsdp 2, checkpointed at steps 2 and 4."""
    return run(tmp_path_factory.mktemp("pp") / "pp-fsdp", "dist.pipeline_parallel=2", "dist.strategy=fsdp", nproc=4)


@pytest.fixture(scope="module")
def pp_1f1b(tmp_path_factory):
    """2 ranks as pp 2 under 1f1b (the default schedule), checkpointed at steps 2 and 4."""
    return run(tmp_path_factory.mktemp("pp") / "pp-1f1b", "dist.pipeline_parallel=2", nproc=2)


def test_two_stages_under_1f1b_equal_one_process(pp_1f1b, one_process):
    assert_equal_to(pp_1f1b, one_process)


@pytest.mark.parametrize(
    "changes",
    [
        ["dist.pipeline.schedule=gpipe"],
        ["dist.pipeline.schedule=interleaved_1f1b", "dist.pipeline.stages_per_rank=2"],
        pytest.param(
            ["dist.pipeline.schedule=zbv", "dist.pipeline.stages_per_rank=2"],
            marks=pytest.mark.skipif(torch_version() < (2, 13), reason="zbv needs torch >= 2.13"),
        ),
    ],
    ids=["gpipe", "interleaved", "zbv"],
)
def test_two_stages_under_other_schedules_equal_one_process(tmp_path, one_process, changes):
    assert_equal_to(run(tmp_path / "pp", "dist.pipeline_parallel=2", *changes, nproc=2), one_process)


def test_an_elastic_restart_after_sigkill_under_pp_ends_bit_identical(tmp_path, pp_1f1b):
    """The last stage's rank killed mid-step (in its last block's forward, step 3 of 4), torchrun's agent
    restarts both from the step-2 checkpoint, and the run ends on the uninterrupted run's weights, bit
    for bit: the same layout, the same schedule, the same data."""
    import os
    import signal

    from conftest import finish
    from runs import assert_identical, start, wait_for

    waiting = tmp_path / "waiting"
    gated = "model._component_=testkit.gated_gpt", "model.rank=1", "model.at_call=9", f"model.waiting={waiting}"
    args = [ROOT / "recipes" / "gpt.yaml", f"run.dir={tmp_path / 'run'}", *TINY, "dist.pipeline_parallel=2"]
    proc = start("run", "--nproc", "2", "--max-restarts", "1", *args, *gated)
    wait_for(waiting, proc)
    os.kill(int(waiting.read_text()), signal.SIGKILL)  # rank 1 dies in a forward of step 3
    out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    assert "restart 1" in out, out[-3000:]
    assert_identical(load_weights(tmp_path / "run"), load_weights(pp_1f1b))


@pytest.mark.parametrize(
    "changes",
    [["dist.strategy=ddp"], ["dist.tensor_parallel=2"]],
    ids=["pp2-x-ddp2", "pp2-x-tp2"],
)
def test_pp_2_with_ddp_or_tp_on_4_ranks_equals_one_process(tmp_path, one_process, changes):
    assert_equal_to(run(tmp_path / "pp", "dist.pipeline_parallel=2", *changes, nproc=4), one_process)


def test_pp_2_x_fsdp_2_equals_one_process_and_converts_to_its_weights(tmp_path, pp_x_fsdp, one_process):
    assert_equal_to(pp_x_fsdp, one_process)
    step = pp_x_fsdp / "checkpoints" / "step_00000004"  # every stage's shards, joined in one file
    proc = launcher("convert", step, "--output", tmp_path / "converted.pt", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_close_rel(torch.load(tmp_path / "converted.pt", weights_only=True), load_weights(pp_x_fsdp), rtol=0)


@pytest.mark.parametrize(
    "nproc,changes",
    [(None, []), (2, ["dist.pipeline_parallel=2"]), (2, ["dist.tensor_parallel=2"])],
    ids=["one-process", "pp2", "tp2"],
)
def test_a_pp_x_fsdp_checkpoint_resumes_at_another_layout(tmp_path, pp_x_fsdp, nproc, changes):
    """Its step-2 checkpoint (DCP shards: each stage's, by the whole model's names) continued in one
    process, at pp 2 alone and at tp 2 alone, ends where the 4 ranks did."""
    resumed = tmp_path / "resumed"
    shutil.copytree(pp_x_fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # as if the run had stopped after step 2
    (resumed / "model.pt").unlink()
    run(resumed, *changes, *(["data.batch_size=16"] if nproc is None else []), nproc=nproc)
    assert_close_rel(load_weights(resumed), load_weights(pp_x_fsdp), rtol=1e-5)


def test_launcher_debug_simulates_pp_2_x_fsdp_2_in_one_process(tmp_path, pp_x_fsdp):
    """`launcher debug --simulate-world-size 4`: one process computes what the 4 ranks of pp 2 x fsdp 2
    did (the same data-parallel arithmetic; the stages' split changes no number)."""
    args = [ROOT / "recipes" / "gpt.yaml", f"run.dir={tmp_path}", *TINY, "dist.pipeline_parallel=2"]
    proc = launcher("debug", "--steps", "4", "--simulate-world-size", "4", *args, "dist.strategy=fsdp", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_rel(load_weights(tmp_path / "debug"), load_weights(pp_x_fsdp), rtol=1e-5)
    got = [r[k] for r in rows(tmp_path / "debug") if "loss" in r for k in ("loss", "grad_norm")]
    want = [r[k] for r in rows(pp_x_fsdp) if "loss" in r for k in ("loss", "grad_norm")]
    assert len(got) == 8 and got == pytest.approx(want, rel=1e-5)


LLAMA = [
    "model.config={_component_: transformers.LlamaConfig, vocab_size: 32, hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 32, "
    "tie_word_embeddings: false, bos_token_id: 2, eos_token_id: 2}",
    "train.max_steps=3",
    "train.eval_every_steps=3",
    "train.warmup_steps=0",
    "scheduler=null",
    "optimizer={_component_: torch.optim.SGD, lr: 0.1, momentum: 0.9}",
    "log.every_n_steps=1",
    "log.wandb=null",
    "data.num_workers=0",
]


def test_a_transformers_llama_at_pp_2_equals_one_process(tmp_path):
    """Padded documents, the model's own loss, the stages built from its decoder layers; the export
    (hf/) is the whole model, built again from the gathered weights."""
    one = run(tmp_path / "one", recipe="hf_causal_lm.yaml", tiny=LLAMA)
    pp = run(
        tmp_path / "pp",
        "data.batch_size=8",
        "dist.pipeline_parallel=2",
        nproc=2,
        recipe="hf_causal_lm.yaml",
        tiny=LLAMA,
    )
    assert_equal_to(pp, one)
    assert sorted(p.name for p in (pp / "hf").iterdir()) == sorted(p.name for p in (one / "hf").iterdir())


@pytest.mark.parametrize(
    "changes,key",
    [
        (["dist.pipeline_parallel=3"], "dist.pipeline_parallel"),
        (["dist.pipeline_parallel=2", "model.n_layers=1"], "dist.pipeline_parallel"),
        (
            ["dist.pipeline_parallel=2", "dist.pipeline.schedule=interleaved_1f1b", "dist.pipeline.stages_per_rank=2"]
            + ["data.batch_size=32", "train.global_batch_size=64"],
            "train.global_batch_size",
        ),
        (["dist.pipeline_parallel=2", "dist.pipeline.schedule=interleaved_1f1b"], "dist.pipeline.stages_per_rank"),
        (["dist.pipeline_parallel=2", "train.loss_mean_over=samples"], "train.loss_mean_over"),
        (["dist.pipeline_parallel=2", "dist.pipeline.split=[9]"], "dist.pipeline.split"),
    ],
    ids=[
        "world-size",
        "more-stages-than-blocks",
        "too-few-micro-batches",
        "one-stage-per-rank",
        "sample-mean",
        "split",
    ],
)
def test_a_bad_pipeline_layout_is_refused_by_check_naming_its_key(changes, key):
    """What `launcher check` and `launcher run` refuse before any worker starts (the model built on
    the meta device, the data not read): each a RecipeError, which the CLI prints as one line."""
    from launcher.commands.check import build_model_cheaply, check_static
    from launcher.parallel import pipelined
    from launcher.parallel.dims import dims_for
    from launcher.recipe.schema import load

    recipe = load(ROOT / "recipes" / "gpt.yaml", changes)
    with pytest.raises(RecipeError) as e:
        check_static(recipe, 4)
        pipelined.plan_rows(recipe, build_model_cheaply(recipe), dims_for(recipe, 4), 4)
    assert e.value.key == key, e.value


def test_check_prints_the_pipeline_its_stages_and_its_bubble():
    proc = launcher("check", "--nproc", "4", ROOT / "recipes" / "gpt.yaml", "dist.pipeline_parallel=2", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"^mesh +4 ranks = 2 pipeline x 2 replicate x 1 shard x 1 tensor$", out, re.M), out
    assert re.search(r"^pipeline +1f1b, 4 micro-batches a step, bubble 20% of a step$", out, re.M), out
    assert re.search(r"^stage 0 \(pipeline rank 0\) +embeddings, blocks 0-2: [\d.]+ MiB per rank$", out, re.M), out
    assert re.search(r"^stage 1 \(pipeline rank 1\) +blocks 3-5, norm, head: [\d.]+ MiB per rank$", out, re.M), out
