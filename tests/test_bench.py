"""The benchmark runs anywhere: CI runs its smoke version on CPU (figures come from a GPU, docs/performance.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, worker_env


def test_bench_smoke_on_cpu_covers_every_implementation():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--device",
            "cpu",
            "--smoke",
            "--workloads",
            "gpt",
            "--impls",
            "raw,launcher,accelerate,fabric",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| gpt |")]
    assert len(table) == 8  # 4 implementations x checkpointing off/on
    for impl in ("raw", "launcher", "accelerate"):
        rows = [line for line in table if f"| {impl} |" in line]
        assert len(rows) == 2 and all(re.search(r"\| [\d,]+ tok/s \|", r) for r in rows), rows
    launcher_rows = [line for line in table if "| launcher |" in line]
    assert all("data wait" in r and "launcher's own start-up" in r for r in launcher_rows)
    fabric = [line for line in table if "| fabric |" in line]
    assert all("tok/s" in r or "skipped: lightning is not installed" in r for r in fabric)


def test_bench_repeats_interleaved_and_profiles_each_implementation(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--device",
            "cpu",
            "--smoke",
            "--workloads",
            "gpt",
            "--impls",
            "raw,launcher",
            "--ckpt",
            "off",
            "--repeat",
            "2",
            "--profile",
            str(tmp_path / "prof"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["round"], r["impl"]) for r in runs] == [(0, "raw"), (0, "launcher"), (1, "launcher"), (1, "raw")]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| gpt |")]
    assert len(table) == 2 and all("n=2)" in line for line in table), table
    for impl in ("raw", "launcher"):  # the first round is traced, the same way for both
        summary = (tmp_path / "prof" / f"gpt-nockpt-{impl}.txt").read_text()
        assert "Self CPU" in summary and "AdamW.step" in summary
        assert (tmp_path / "prof" / f"gpt-nockpt-{impl}.trace.json").stat().st_size > 0
    # the two traces compared: operators per step and peak memory (both traced with memory)
    diff = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "trace_diff.py"),
            str(tmp_path / "prof" / "gpt-nockpt-raw.trace.json"),
            str(tmp_path / "prof" / "gpt-nockpt-launcher.trace.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=worker_env(),
        check=True,
    ).stdout
    assert "(5 steps)" in diff and "aten::add_" in diff, diff  # the launcher's loss sum, one add per step
    assert re.search(r"peak allocated on cpu: A [\d.]+ MiB, B [\d.]+ MiB", diff), diff


def test_overhead_script_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--steps", "400"],
        capture_output=True,
        text=True,
        timeout=300,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"the launcher adds -?\d+ us per step", proc.stdout)


def test_the_gpu_check_smoke_runs_every_part_within_its_budget(tmp_path):
    """bench/gpu_check.sh --smoke, CPU-sized: every part ends by itself within its time budget (none cut
    short), and each writes its rounds into the results folder: the DDP-path rows (GPT, compiled GPT,
    ResNet-18), FSDP2, and the transformers GPT-2 rows, 3 rounds in one process for each implementation
    (hand-written, launcher, transformers.Trainer; a peer that is not installed is skipped, saying so)."""
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=worker_env(PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    parts = ["ddp-gpt", "ddp-resnet", "fsdp", "hf-gpt2", "gpu-tests"]
    for part in parts:
        assert re.search(f"^{part}: exit 0 after \\d+ s$", summary, re.M), (
            part,
            summary,
            (out / f"{part}.log").read_text()[-3000:],
        )
    assert "cut short" not in summary and "device: cpu" in summary

    def rounds(name: str) -> dict[str, int]:
        runs = json.loads((out / f"{name}.json").read_text())["runs"]
        assert all(r["throughput"] > 0 for r in runs if "throughput" in r), runs
        return {impl: sum(r["impl"] == impl for r in runs) for impl in {r["impl"] for r in runs}}

    assert {"raw": 3, "launcher": 3}.items() <= rounds("ddp-gpt").items()
    assert rounds("compiled-gpt") == {"raw compiled": 3, "launcher compiled": 3}
    assert {"raw": 3, "launcher": 3}.items() <= rounds("ddp-resnet").items()
    assert rounds("hf-gpt2") == {"raw": 3, "launcher": 3, "trainer": 3}
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert len(fsdp["rounds"]["hand_written"]) == len(fsdp["rounds"]["launcher"]) == 3
    assert "torch" in (out / "machine.txt").read_text()


def test_trainer_exactness_script_measures_the_launchers_rule_exact():
    """bench/trainer_exactness.py, the source of docs/huggingface.md's comparison with
    transformers.Trainer: it runs, and its token-weighted row (the launcher's rule) is the exact update."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "trainer_exactness.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=worker_env(HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(
        r"^\| token-weighted accumulation \(the launcher's rule\) \| ([\d.]+) \| ([\d.]+) \|", proc.stdout, re.M
    )
    assert row and float(row[1]) == pytest.approx(1.0, abs=1e-4) and float(row[2]) == pytest.approx(1.0, abs=1e-4)
    assert re.search(r"^\| Trainer defaults, GPT2LMHeadModel \| [\d.]+ \|", proc.stdout, re.M), proc.stdout
