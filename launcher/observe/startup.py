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
    """Seconds from process start to each mark, and the time to the first step in parts: what any
    PyTorch program pays (import torch; building the model and the first optimizer, which imports
    torch._dynamo, over a second on a small CPU; moving the model to the device, where a GPU's CUDA
    context is created; the first step itself, with its batch, the first use of each kernel and
    library, and torch.compile), and the rest: the launcher's own (recipe, process group, data,
    loaders, checkpoint, wrapping)."""
    start = process_start()
    out = {f"{k}_s": round(v - start, 4) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    if {"torch", "model_start", "model", "optimizer_start", "optimizer", "loop", "first_step"} <= marks.keys():
        model_build = marks["model"] - marks["model_start"]
        optimizer_build = marks["optimizer"] - marks["optimizer_start"]
        device = marks["device"] - marks["device_start"] if {"device_start", "device"} <= marks.keys() else 0.0
        out["model_build_s"] = round(model_build, 4)
        out["optimizer_build_s"] = round(optimizer_build, 4)
        out["to_device_s"] = round(device, 4)
        out["first_step_itself_s"] = round(marks["first_step"] - marks["loop"], 4)
        own = marks["loop"] - marks["torch"] - model_build - optimizer_build - device
        out["launcher_s"] = round(own, 4)
    if "model_start" in peak_rss_mib:  # python, torch, the launcher and the process group: before any weights
        out["peak_rss_before_model_mib"] = round(peak_rss_mib["model_start"], 1)
    if {"model_start", "optimizer_start"} <= peak_rss_mib.keys():
        # what building, loading and sharding the model added to this process's peak memory
        out["model_peak_rss_growth_mib"] = round(peak_rss_mib["optimizer_start"] - peak_rss_mib["model_start"], 1)
    return out
