"""CUDA paths at world size 1: nccl process group, pinned memory, autocast, GradScaler, checkpointing.
Skipped without CUDA; run them wherever a GPU is available."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, launcher, worker_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_quickstart_under_torchrun_uses_nccl_and_tears_down_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "launcher", "run", str(ROOT / "recipes" / "quickstart.yaml"), f"run.dir={tmp_path}", "train.precision=bf16"]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "nccl / cuda:0" in proc.stdout
    assert "destroy_process_group" not in proc.stderr and "not destroyed" not in proc.stderr.lower(), proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "val_accuracy" in r][-1]["val_accuracy"] >= 0.9


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpt_on_cuda_with_checkpointing(tmp_path, precision):
    launcher("run", ROOT / "recipes" / "gpt.yaml", f"run.dir={tmp_path}", "train.max_steps=20", f"train.precision={precision}",
             "model.n_layers=2", "data.train.max_bytes=400000", "data.val.max_bytes=400000",
             "train.activation_checkpointing.segments=2", "train.eval_every_steps=20", "scheduler.T_max=20",
             "train.warmup_steps=2", "train.global_batch_size=32", check=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] and rows[-1]["val_loss"] < 5.0
