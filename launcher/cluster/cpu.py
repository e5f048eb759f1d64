"""The CPU a rank runs on: how many threads its operators may use, and whether it computes bf16
natively."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# the user's (or torchrun's) explicit choice, which wins
THREADS_ENV = "OMP_NUM_THREADS"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: what SLURM, taskset or a container allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Intra-op threads for one rank, and why: OMP_NUM_THREADS if set; else SLURM's
    --cpus-per-task (SLURM binds each task to its own cores); else the available cores shared
    among the ranks on this machine. Oversubscribing the cores makes every rank slower."""
    environ = os.environ if environ is None else environ
    cores = available_cores()
    if environ.get(THREADS_ENV, "").isdigit() and int(environ[THREADS_ENV]) > 0:
        return int(environ[THREADS_ENV]), f"{THREADS_ENV}={environ[THREADS_ENV]}"
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        return max(1, min(cores, int(per_task))), f"SLURM_CPUS_PER_TASK={per_task}"
    n = max(1, cores // max(1, local_world_size))
    return (
        n,
        f"{cores} core{'s' if cores != 1 else ''} for {local_world_size} "
        f"local rank{'s' if local_world_size != 1 else ''}",
    )


def has_native_bf16() -> bool | None:
    """Does this CPU compute bf16 in hardware (AVX512-BF16 or AMX)? None if unknown (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return None
    return None


def precision_warning(precision: str, device_type: str) -> str | None:
    """bf16/fp16 autocast on a CPU that emulates them is several times slower than fp32."""
    if device_type != "cpu" or precision == "fp32" or has_native_bf16() is not False:
        return None
    return (
        f"train.precision={precision} on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag) is "
        "emulated and several times slower than fp32: use train.precision=fp32 on this machine"
    )


_MATMUL_SIDE = 512


def matmul_flops_per_s(precision: str, threads: int, seconds: float = 0.2) -> float:
    """This CPU's matrix-multiply rate in `precision` (autocast's dtype) on `threads` intra-op
    threads (one rank's share), measured for `seconds`."""
    import time

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n, before = _MATMUL_SIDE, torch.get_num_threads()
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.set_num_threads(threads)
    try:
        a @ b  # warm-up: thread pool, kernels
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            count += 1
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 * count / elapsed


@dataclass(frozen=True)
class StepTimeEstimate:
    seconds: float
    how: str  # what it was computed from, for the line that shows it

    def describe(self) -> str:
        return f"~{duration(self.seconds)} ({self.how})"


def step_time_estimate(
    flops_per_sample: float, global_batch: int, world_size: int, threads_per_rank: int, precision: str
) -> StepTimeEstimate:
    """One optimizer step's time on CPU ranks, from the model's FLOPs and one measured matmul rate
    per rank: each of `world_size` ranks computes its share of the global batch on its threads. The
    same figure at `launcher check --nproc N` and in the run's plan (the same measurement on the same
    threads). A floor, not a forecast: attention, norms, the optimizer and the data run below matmul
    speed; the run shows the measured step time next to it after its first steps."""
    rate = matmul_flops_per_s(precision, threads_per_rank)
    flops = flops_per_sample * global_batch
    seconds = flops / (rate * world_size)
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    return StepTimeEstimate(
        seconds,
        f"{flops / 1e9:,.0f} GFLOP over {ranks} at {rate / 1e9:,.1f} GFLOP/s each: a {_MATMUL_SIDE}x{_MATMUL_SIDE} "
        f"{precision} matmul measured here on {threads_per_rank} thread{'s' if threads_per_rank != 1 else ''}; "
        "attention, norms and the optimizer run slower",
    )


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
