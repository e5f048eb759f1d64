"""`log.profile`: a torch.profiler trace of a few optimizer steps, to find where the time goes.

The profiler starts once `start_step` optimizer steps are done, warms up for one step (its first
step carries the profiler's own start-up cost), then records `steps` steps. Each listed rank writes
`<run.dir>/profile/rank<R>.trace.json` (open it in https://ui.perfetto.dev or chrome://tracing)
and `rank<R>.txt`, the operators that took the most time (device time on GPUs, CPU time otherwise).
Nothing is imported or done per step unless it is on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.observe.logs import log

if TYPE_CHECKING:
    from torch.profiler import profile


class StepProfiler:
    """Drives `torch.profiler.profile` from optimizer-step boundaries: call `after_step(steps_done)`
    before the first step and after every optimizer step, and `close()` at the end."""

    def __init__(
        self,
        out_dir: Path,
        name: str,
        device: torch.device,
        start_step: int,
        steps: int,
        memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        self.out_dir, self.name, self.device = Path(out_dir), name, device
        self.start_step, self.steps = start_step, steps
        self.memory, self.with_stack = memory, with_stack
        self._prof: profile | None = None
        self._calls = 0  # profiler steps since it started
        self.done = False

    @property
    def active(self) -> bool:
        return self._prof is not None

    def after_step(self, steps_done: int) -> None:
        if self.done:
            return
        if self._prof is None:
            if steps_done == self.start_step:
                self._start()
            return
        self._prof.step()
        self._calls += 1
        if self._calls == self.steps + 1:  # one warm-up step, then `steps` recorded ones: the trace is out
            self._stop()

    def close(self) -> None:
        """At the end of training: a profile still running is cut short and written as it is."""
        if self._prof is not None:
            recorded = max(self._calls - 1, 0)
            log.warning(
                f"log.profile: training ended after {recorded} of {self.steps} profiled steps; "
                f"writing what was recorded"
            )
            self._stop()

    def _stop(self) -> None:
        assert self._prof is not None
        self._prof.stop()  # writes the trace (on_trace_ready)
        self._prof, self.done = None, True

    def _start(self) -> None:
        # kineto prints its stages, and on CPU-only machines a spurious "gpuGetDeviceCount failed"
        # error; on GPUs keep its errors (4), on CPUs nothing (6). Read once, when kineto starts.
        os.environ.setdefault("KINETO_LOG_LEVEL", "4" if self.device.type == "cuda" else "6")
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=1, active=self.steps, repeat=1),
            on_trace_ready=self._write,
            profile_memory=self.memory,
            with_stack=self.with_stack,
            record_shapes=False,
        )
        prof.start()

    def _write(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace, summary = self.out_dir / f"{self.name}.trace.json", self.out_dir / f"{self.name}.txt"
        prof.export_chrome_trace(str(trace))
        summary.write_text(summary_table(prof, self.device) + "\n")
        log.info(
            f"log.profile: steps {self.start_step + 2}-{self.start_step + 1 + self.steps} traced: {trace} "
            f"(open in https://ui.perfetto.dev), top operators in {summary}"
        )


def summary_table(prof: profile, device: torch.device, rows: int = 30) -> str:
    """The operators that took the most self time: on the device for CUDA runs, else on the CPU."""
    if device.type == "cuda":
        from torch.autograd.profiler_util import FunctionEventAvg

        key = (
            "self_device_time_total" if hasattr(FunctionEventAvg, "self_device_time_total") else "self_cuda_time_total"
        )
    else:
        key = "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def read_trace(path: Path) -> dict:
    """What a trace written by `log.profile` (or the bench) holds, for comparing two runs:
    `steps` (recorded optimizer steps), `ops` (a Counter of aten operators and of device kernels,
    over the recorded steps) and `peak_bytes` ({device: highest allocated bytes}, with
    `log.profile.memory`; on CUDA the allocator's total, on CPU counted from the profiler's start)."""
    import json
    from collections import Counter

    events = json.loads(Path(path).read_text())["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    ops: Counter = Counter()
    peak: dict[str, int] = {}
    for e in events:
        cat = e.get("cat")
        if cat == "cpu_op" and e["name"].startswith("aten::"):
            ops[e["name"]] += 1
        elif cat == "kernel":
            ops["kernel: " + e["name"]] += 1
        elif e.get("name") == "[memory]":
            a = e["args"]
            device = "cpu" if a.get("Device Type") == 0 else f"cuda:{a.get('Device Id')}"
            peak[device] = max(peak.get(device, 0), a.get("Total Allocated", 0))
    return {"steps": len(steps), "ops": ops, "peak_bytes": peak}
