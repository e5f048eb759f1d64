"""The benchmark runs anywhere: CI runs its smoke version on CPU (figures come from a GPU, docs/performance.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, worker_env


def bench(script: str, *args: str, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGS` as CI runs it, its output captured."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(**env))


def assert_rows_cover_every_implementation(table: list[str]) -> None:
    """bench.py's table rows of one workload and checkpointing setting: one row per implementation
    with its throughput, the launcher's with its own notes (Fabric's: skipped where lightning is not
    installed, saying so)."""
    for impl in ("raw", "launcher", "accelerate"):
        rows = [line for line in table if f"| {impl} |" in line]
        assert len(rows) == 1 and re.search(r"\| [\d,]+ tok/s[ |]", rows[0]), (impl, table)
    launcher_row = next(line for line in table if "| launcher |" in line)
    assert "data wait" in launcher_row and "launcher's own start-up" in launcher_row, launcher_row
    fabric = [line for line in table if "| fabric |" in line]
    assert len(fabric) == 1 and ("tok/s" in fabric[0] or "skipped: lightning is not installed" in fabric[0]), table


def test_bench_smoke_with_checkpointing_covers_the_peers():
    """Accelerate's and Fabric's rows with activation checkpointing (the gpu-check smoke below has
    every implementation's row without it, the repeats test the hand-written and launcher rows with it)."""
    args = ["--device", "cpu", "--smoke", "--workloads", "gpt", "--impls", "accelerate,fabric", "--ckpt", "on"]
    proc = bench("bench.py", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| gpt |")]
    assert len(table) == 2 and all(line.startswith("| gpt | True |") for line in table), table
    assert re.search(r"\| accelerate \| [\d,]+ tok/s \|", table[0]), table
    assert "tok/s" in table[1] or "skipped: lightning is not installed" in table[1], table


def test_bench_repeats_interleaved_and_profiles_each_implementation(tmp_path):
    """With activation checkpointing (the gpu-check smoke has the rows without it): --repeat 2
    interleaves the implementations, the table gives medians over both, and the first round of each
    is traced, the same way for both."""
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--smoke", "--workloads", "gpt", "--impls", "raw,launcher", "--ckpt", "on"]
    args += ["--repeat", "2", "--profile", str(tmp_path / "prof"), "--json", str(out)]
    proc = bench("bench.py", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["round"], r["impl"]) for r in runs] == [(0, "raw"), (0, "launcher"), (1, "launcher"), (1, "raw")]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| gpt |")]
    assert len(table) == 2 and all(re.search(r"^\| gpt \| True \| \w+ \| [\d,]+ tok/s \(.*n=2\)", x) for x in table), (
        table
    )
    launcher_row = next(line for line in table if "| launcher |" in line)
    assert "data wait" in launcher_row and "launcher's own start-up" in launcher_row, launcher_row
    for impl in ("raw", "launcher"):  # the first round is traced, the same way for both
        summary = (tmp_path / "prof" / f"gpt-ckpt-{impl}.txt").read_text()
        assert "Self CPU" in summary and "AdamW.step" in summary
        assert (tmp_path / "prof" / f"gpt-ckpt-{impl}.trace.json").stat().st_size > 0
    # the two traces compared: operators per step and peak memory (both traced with memory)
    diff = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "trace_diff.py"),
            str(tmp_path / "prof" / "gpt-ckpt-raw.trace.json"),
            str(tmp_path / "prof" / "gpt-ckpt-launcher.trace.json"),
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
    proc = bench("overhead.py", "--steps", "400", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"the launcher adds -?\d+ us per step", proc.stdout)


def test_the_gpu_check_smoke_runs_every_part_within_its_budget(tmp_path):
    """bench/gpu_check.sh --smoke, CPU-sized: every part ends by itself within its time budget (none cut
    short), and each writes its rounds into the results folder: the DDP-path rows (GPT, compiled GPT,
    ResNet-18), FSDP2, and the transformers GPT-2 rows, 2 rounds in one process for each implementation
    (hand-written, launcher, Accelerate, transformers.Trainer; a peer that is not installed is skipped,
    saying so). The GPT part's table is bench.py's without checkpointing: every implementation's row
    (test_bench_smoke_with_checkpointing_covers_the_peers and the repeats test have the rows with it)."""
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

    assert {"raw": 2, "launcher": 2, "accelerate": 2}.items() <= rounds("ddp-gpt").items()
    assert rounds("compiled-gpt") == {"raw compiled": 2, "launcher compiled": 2}
    assert {"raw": 2, "launcher": 2, "accelerate": 2}.items() <= rounds("ddp-resnet").items()
    assert rounds("hf-gpt2") == {"raw": 2, "launcher": 2, "trainer": 2}
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert len(fsdp["rounds"]["hand_written"]) == len(fsdp["rounds"]["launcher"]) == 2
    # the GPT part's table: a row per implementation, the launcher's with its own notes
    table = [line for line in (out / "ddp-gpt.log").read_text().splitlines() if line.startswith("| gpt | False |")]
    assert_rows_cover_every_implementation(table)
    assert "torch" in (out / "machine.txt").read_text()


def test_trainer_exactness_script_measures_the_launchers_rule_exact():
    """bench/trainer_exactness.py, the source of docs/huggingface.md's comparison with
    transformers.Trainer: it runs, and its token-weighted row (the launcher's rule) is the exact update."""
    proc = bench("trainer_exactness.py", timeout=300, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(
        r"^\| token-weighted accumulation \(the launcher's rule\) \| ([\d.]+) \| ([\d.]+) \|", proc.stdout, re.M
    )
    assert row and float(row[1]) == pytest.approx(1.0, abs=1e-4) and float(row[2]) == pytest.approx(1.0, abs=1e-4)
    assert re.search(r"^\| Trainer defaults, GPT2LMHeadModel \| [\d.]+ \|", proc.stdout, re.M), proc.stdout


def test_the_context_parallel_bench_smoke_runs_the_launcher_and_says_why_not_torchs(tmp_path):
    """bench/cp.py --smoke on CPU: the launcher's row at cp 2 on 2 gloo ranks, with figures, the line
    that says torch's context_parallel does not run on CPU, and where it ran (command, machine, date),
    in the table and the JSON (the comparison itself needs 2 GPUs: docs/performance.md)."""
    proc = bench("cp.py", "--device", "cpu", "--smoke", "--json", str(tmp_path / "cp.json"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert re.match(
        r"# python bench/cp\.py --device cpu --smoke .* \| .*CPU.* \| torch \S+ \| \d{4}-\d\d-\d\d$", lines[0]
    ), lines
    assert any(re.match(r"launcher +[\d.]+ +[\d,]+ +[\d.]+ +\d+\.\d{4}$", line) for line in lines), lines
    assert any(line.startswith("hand_written  skipped: torch's context_parallel does not run on CPU") for line in lines)
    result = json.loads((tmp_path / "cp.json").read_text())
    assert (
        result["command"].startswith("python bench/cp.py --device cpu --smoke") and result["machine"] and result["date"]
    )
    assert result["cp"] == 2 and len(result["rounds"]["launcher"]) == 1 and result["launcher"]["loss"] > 0
    assert "hand_written" in result["skipped"]
