"""Pipeline layouts too big for the test suite on CI's 2 cores: pp 2 x ddp 2, pp 2 x tp 2 (4 ranks)
and pp 2 x fsdp 2 x tp 2 (8 ranks), and any other you name, against one process with the same global
batch, the tiny GPT of tests/test_pipeline_runs.py (fp32, SGD with momentum, clipping on). Prints,
per layout, the largest relative difference of any weight tensor and of the logged loss and
gradient norm; the promise is 1e-5.

    python bench/pp_layouts.py                                       # the three above
    python bench/pp_layouts.py --layout 4:2:1:ddp:interleaved_1f1b   # nproc:pp:tp:strategy:schedule
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_pipeline_runs import TINY  # noqa: E402  (the suite's shape and settings, one source)

LAYOUTS = ["4:2:1:ddp:1f1b", "4:2:2:ddp:1f1b", "8:2:2:fsdp:1f1b"]


def run(run_dir: Path, nproc: int | None, *changes: str) -> Path:
    cmd = [sys.executable, "-m", "launcher", "run", *(["--nproc", str(nproc)] if nproc else [])]
    cmd += [str(ROOT / "recipes" / "gpt.yaml"), f"run.dir={run_dir}", *TINY, *changes]
    subprocess.run(cmd, check=True, capture_output=True)
    return run_dir


def rows(run_dir: Path) -> list[tuple[float, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", action="append", help=f"nproc:pp:tp:strategy:schedule (default {', '.join(LAYOUTS)})")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", None, "data.batch_size=16")
        weights = torch.load(one / "model.pt", weights_only=True)
        for layout in args.layout or LAYOUTS:
            nproc, pp, tp, strategy, schedule = layout.split(":")
            changes = [f"dist.pipeline_parallel={pp}", f"dist.tensor_parallel={tp}", f"dist.strategy={strategy}"]
            changes += [f"dist.pipeline.schedule={schedule}"]
            if schedule.startswith("interleaved") or schedule in ("zbv", "dualpipev"):
                changes.append("dist.pipeline.stages_per_rank=2")
            got = run(Path(tmp) / layout.replace(":", "-"), int(nproc), *changes)
            other = torch.load(got / "model.pt", weights_only=True)
            worst = max(float((other[k] - weights[k]).norm() / max(weights[k].norm(), 1e-12)) for k in weights)
            pairs = zip(rows(got), rows(one), strict=True)
            logged = max(abs(a - b) / abs(b) for mine, ref in pairs for a, b in zip(mine, ref, strict=True))
            print(f"{layout:>18}: weights {worst:.2e}, loss and gradient norm {logged:.2e} (relative, worst)")


if __name__ == "__main__":
    main()
