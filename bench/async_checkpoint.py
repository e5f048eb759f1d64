"""How long training is blocked per checkpoint, synchronous against checkpoint.async_save, and the
host memory the asynchronous one adds.

    python bench/async_checkpoint.py                    # a 1 GiB checkpoint, whole (ddp: state.pt)
    python bench/async_checkpoint.py --sharded          # the same through DCP (fsdp at one rank)
    python bench/async_checkpoint.py --mib 64 --repeat 1   # a smoke run

Each round saves the same model with the launcher's Checkpointer: synchronously (blocked: the
whole save), then asynchronously (blocked: asking for the state and copying it to host memory;
the write then runs in a thread, timed until it is on disk). The peak resident memory above the
baseline is sampled every 5 ms during each save. Prints one JSON object; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.checkpoint.background import BackgroundWrite  # noqa: E402
from launcher.checkpoint.checkpointer import Checkpointer  # noqa: E402
from launcher.checkpoint.sharded_state import ModelState, OptimizerState  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The largest resident set size seen while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(mib: int, sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """fp32 weights of `mib` / 2 and SGD's momentum as much: a checkpoint of `mib`."""
    width = 2048
    layers = max(1, mib * 2**20 // (2 * width * width * 4))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    # with state, as a real optimizer has (DCP re-initialises a stateless one's at every save)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    objects = (
        {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
        if sharded
        else {"model": model, "optimizer": optimizer}
    )
    return model, optimizer, objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the checkpoint: weights and momentum")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sharded", action="store_true", help="through DCP, as under fsdp (one rank)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    if args.sharded:
        import torch.distributed as dist

        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    model, _, objects = build(args.mib, args.sharded)
    state_mib = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sync_s, blocked_s, background_s, sync_peak, async_peak = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        sharded = frozenset(objects) if args.sharded else frozenset()
        group = None
        if args.sharded:
            import torch.distributed as dist

            group = dist.new_group(backend="gloo")
        plain = Checkpointer(Path(d) / "sync", keep_last=1, is_writer=True, sharded=sharded)
        overlapped = Checkpointer(
            Path(d) / "async", keep_last=1, is_writer=True, sharded=sharded, background=BackgroundWrite(group)
        )
        for step in range(1, args.repeat + 1):
            base = rss_bytes()
            with PeakRss() as peak:
                t0 = time.perf_counter()
                plain.save(step, objects, {"bench": True})
                sync_s.append(time.perf_counter() - t0)
            sync_peak.append(peak.peak - base)
            base = rss_bytes()
            with PeakRss() as peak:
                t0 = time.perf_counter()
                overlapped.save(step, objects, {"bench": True}, blocking=False)
                t1 = time.perf_counter()
                overlapped.wait()
                t2 = time.perf_counter()
            blocked_s.append(t1 - t0)
            background_s.append(t2 - t1)
            async_peak.append(peak.peak - base)
    med = statistics.median
    result = {
        "state_mib": round(state_mib, 1),
        "mode": "sharded (DCP)" if args.sharded else "whole (state.pt)",
        "rounds": args.repeat,
        "sync_blocked_s": round(med(sync_s), 3),
        "async_blocked_s": round(med(blocked_s), 3),
        "async_background_write_s": round(med(background_s), 3),
        "blocked_ratio": round(med(blocked_s) / med(sync_s), 3),
        "sync_peak_extra_mib": round(med(sync_peak) / 2**20, 1),
        "async_peak_extra_mib": round(med(async_peak) / 2**20, 1),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
