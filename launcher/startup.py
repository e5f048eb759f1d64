"""Time from process start to the first optimizer step, and where it went (`startup.json`)."""

from __future__ import annotations

import os
import time

marks: dict[str, float] = {}
peak_rss_mib: dict[str, float] = {}  # the process's peak resident memory by each mark


def process_start() -> float:
    """Wall-clock time this process started (Linux: /proc; elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def mark(name: str) -> None:
    import resource

    marks.setdefault(name, time.time())
    peak_rss_mib.setdefault(name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def report() -> dict[str, float]:
    """Seconds from process start to each mark; the model and optimizer builds; and the rest, which
    is the launcher's own start-up (recipe, data, loaders, wrapping) plus the first step itself.
    Building the first torch optimizer imports torch._dynamo (over a second on a small CPU), in any
    PyTorch program, hence its own line."""
    start = process_start()
    out = {f"{k}_s": round(v - start, 4) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    if {"torch", "model_start", "model", "optimizer_start", "optimizer", "first_step"} <= marks.keys():
        model_build = marks["model"] - marks["model_start"]
        optimizer_build = marks["optimizer"] - marks["optimizer_start"]
        out["model_build_s"] = round(model_build, 4)
        out["optimizer_build_s"] = round(optimizer_build, 4)
        out["launcher_s"] = round(marks["first_step"] - marks["torch"] - model_build - optimizer_build, 4)
    if "model_start" in peak_rss_mib:  # python, torch, the launcher and the process group: before any weights
        out["peak_rss_before_model_mib"] = round(peak_rss_mib["model_start"], 1)
    if {"model_start", "optimizer_start"} <= peak_rss_mib.keys():
        # what building, loading and sharding the model added to this process's peak memory
        out["model_peak_rss_growth_mib"] = round(peak_rss_mib["optimizer_start"] - peak_rss_mib["model_start"], 1)
    return out
