"""The CPU a rank runs on: how many threads its operators may use, and whether it computes bf16
natively."""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def matmul_flops_per_s(precision: str, seconds: float = 0.2) -> float:
    """This CPU's matrix-multiply rate in `precision` (autocast's dtype), measured for `seconds`
    with every thread this process may use."""
    import time

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, kernels
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def step_time_estimate(flops_per_sample: float, global_batch: int, precision: str) -> str:
    """One optimizer step's time on this CPU, roughly, from the model's FLOPs and a measured matmul
    rate: enough to tell seconds from minutes before the first step."""
    rate = matmul_flops_per_s(precision)
    seconds = flops_per_sample * global_batch / rate
    return (
        f"~{duration(seconds)} ({flops_per_sample * global_batch / 1e9:,.0f} GFLOP at {rate / 1e9:,.1f} GFLOP/s, "
        f"a {precision} matmul measured here)"
    )


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
