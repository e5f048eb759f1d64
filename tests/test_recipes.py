"""Every shipped recipe validates; the quickstart trains to its promised accuracy; the others run."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, TINY_GPT_SHAPE, launcher, worker_env
from launcher.parallel.sharding import MIN_TORCH, torch_version

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {
        "quickstart.yaml",
        "cifar10_resnet18.yaml",
        "imagefolder_resnet18.yaml",
        "gpt.yaml",
    }


# recipes that name hub ids: checked offline against stand-ins laid out under those ids (hubkit)
HUB_RECIPES = {"sft_lora_hub.yaml"}
# recipes that fine-tune another recipe's export (sft_lora.yaml: runs/hf_causal_lm/hf), checked on a stand-in
SECOND_STEPS = {"sft_lora.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_passes_check(recipe, tmp_path, monkeypatch):
    from launcher.commands import cli

    monkeypatch.chdir(tmp_path)  # a recipe that writes its own data writes it here
    if recipe.name in HUB_RECIPES:
        from hubkit import stand_ins

        cache = stand_ins(tmp_path / "hub", tmp_path / "stand-ins")
        env = worker_env(HF_HUB_CACHE=str(cache), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
        proc = launcher("check", recipe, "--nproc", "8", env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for repo in ("Qwen/Qwen2.5-0.5B", "HuggingFaceH4/no_robots"):
            assert re.search(f"^from the hub +{repo} at commit", proc.stdout, re.M), proc.stdout
        return
    if recipe.name in SECOND_STEPS:
        from hfkit import example_base

        example_base(tmp_path)  # what the first step exports, untrained: check needs its shapes only
    assert cli.main(["check", str(recipe), "--nproc", "2"]) == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_key_is_commented(recipe):
    """Every key carries a comment, except `_component_` lines, which name themselves."""
    uncommented = []
    for n, line in enumerate(recipe.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#") or " # " in text or text.startswith("_component_:"):
            continue
        sections = ("model", "data", "loss", "optimizer", "scheduler", "train", "dist", "log", "run")
        if text.split(":")[0] in sections and text.endswith(":") and not line.startswith(" "):
            continue  # a top-level section header
        uncommented.append(f"{recipe.name}:{n}: {text}")
    assert not uncommented, "\n".join(uncommented)


def test_quickstart_trains_on_two_ranks_to_90_percent(tmp_path):
    run_dir = tmp_path / "qs"
    proc = launcher("run", "--nproc", "2", ROOT / "recipes" / "quickstart.yaml", f"run.dir={run_dir}", check=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val_accuracy" in r][-1]
    assert final["val_accuracy"] >= 0.90, final
    assert final["step"] == 230
    assert "done: completed after 230 steps" in proc.stdout


# the GPT recipes, shrunk to train 3 steps on a CPU in seconds
TINY_GPT = [
    *TINY_GPT_SHAPE,
    "data.train.max_bytes=20000",
    "data.val.max_bytes=20000",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.activation_checkpointing.segments=2",
    "train.eval_every_steps=3",
    "scheduler.T_max=3",
    "train.warmup_steps=1",
]


# the plan's step-time line, less the measured rate and its result, which vary from run to run
ESTIMATE = re.compile(
    r"step time \(estimate\) +~[\d.]+ m?s \(([\d,]+ GFLOP over \d+ ranks?) at [\d.,]+ GFLOP/s each: (.*)\)"
)


def test_gpt_recipe_trains_a_few_steps(tmp_path):
    args = [ROOT / "recipes" / "gpt.yaml", f"run.dir={tmp_path}", "train.precision=fp32", "train.global_batch_size=8"]
    args += ["train.max_steps=3", "log.every_n_steps=1", *TINY_GPT]
    proc = launcher("run", *args, check=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["val_loss"] < 6.0  # below uniform over 256 bytes (5.55 + noise)
    # one step-time estimate, made the same way at check and in the run, then the measured figure beside it
    planned = ESTIMATE.search(proc.stdout)
    assert planned, proc.stdout
    checked = ESTIMATE.search(launcher("check", *args, check=True).stdout)
    assert checked and checked.groups() == planned.groups(), (checked, planned)
    assert re.search(
        r"^step time: [\d.]+ m?s measured over steps 2-2, [\d.]+x the plan's estimate of ~", proc.stdout, re.M
    )


def test_imagefolder_recipe_trains_on_generated_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    launcher(
        "run",
        ROOT / "recipes" / "imagefolder_resnet18.yaml",
        f"run.dir={tmp_path / 'run'}",
        f"data.train.root={tmp_path / 'train'}",
        f"data.val.root={tmp_path / 'val'}",
        "data.train.image_size=32",
        "data.val.image_size=32",
        "data.batch_size=2",
        "data.num_workers=1",
        "train.precision=fp32",
        "train.channels_last=true",  # NCHW in, channels-last weights and activations
        "train.epochs=1",
        "train.warmup_steps=0",
        check=True,
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "val_accuracy" in rows[-1]


@pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
def test_gpt_fsdp_recipe_trains_a_few_steps_on_two_ranks_in_bf16(tmp_path):
    launcher(
        "run",
        "--nproc",
        "2",
        ROOT / "recipes" / "gpt_fsdp.yaml",
        f"run.dir={tmp_path}",
        "train.max_steps=3",
        "train.global_batch_size=16",
        *TINY_GPT,
        "log.wandb.mode=offline",
        check=True,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["val_loss"] < 6.0
    assert list((tmp_path / "checkpoints" / "step_00000003" / "shards").glob("*.distcp"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
