"""What one traced step does that another does not: operators, kernels and peak memory.

    python bench/trace_diff.py A.trace.json B.trace.json

For traces from `bench.py --profile DIR` (every implementation traced on the same 5 steps after
the warm-up) or from a run's `log.profile` (`log.profile.memory: true` for the peaks). Prints the
aten operators and device kernels whose count per step differs, and each device's peak allocated
memory during the recorded steps. E.g. the launcher against the hand-written loop, ResNet-18:

    python bench/bench.py --workloads resnet18 --impls raw,launcher --ckpt off --profile /tmp/prof
    python bench/trace_diff.py /tmp/prof/resnet18-nockpt-raw.trace.json /tmp/prof/resnet18-nockpt-launcher.trace.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.observe.profiling import read_trace  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args()
    a, b = read_trace(Path(args.a)), read_trace(Path(args.b))
    na, nb = max(a["steps"], 1), max(b["steps"], 1)
    print(f"A: {args.a} ({a['steps']} steps)\nB: {args.b} ({b['steps']} steps)\n")
    rows = [(name, a["ops"][name] / na, b["ops"][name] / nb) for name in sorted(a["ops"].keys() | b["ops"].keys())]
    rows = [r for r in rows if r[1] != r[2]]
    if rows:
        width = min(max(len(r[0]) for r in rows), 100)
        print(f"{'per step':<{width}}  {'A':>8}  {'B':>8}")
        for name, x, y in sorted(rows, key=lambda r: -abs(r[2] - r[1])):
            print(f"{name[:width]:<{width}}  {x:>8g}  {y:>8g}")
    else:
        print("the same operators and kernels, the same number of times per step")
    for device in sorted(a["peak_bytes"].keys() | b["peak_bytes"].keys()):
        x, y = a["peak_bytes"].get(device), b["peak_bytes"].get(device)
        diff = f", B - A = {(y - x) / 2**20:+.3f} MiB" if x is not None and y is not None else ""
        print(f"\npeak allocated on {device}: A {_mib(x)}, B {_mib(y)}{diff}")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.3f} MiB"


if __name__ == "__main__":
    main()
