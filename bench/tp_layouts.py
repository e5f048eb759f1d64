"""Layouts too big for the test suite on CI's 2 cores: 8 ranks as hsdp 2 x 2 x tp 2 (and any other
you name) against one process with the same global batch, the tiny GPT of
tests/test_tensor_parallel.py (fp32, SGD with momentum, clipping on). Prints, per layout, the
largest relative difference of any weight tensor and of the logged loss and gradient norm; the
promise is 1e-5.

    python bench/tp_layouts.py                                  # hsdp 2 x 2 x tp 2 on 8 CPU ranks
    python bench/tp_layouts.py --layout 8:fsdp:4 --layout 8:ddp:2   # nproc:strategy:tensor_parallel
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

from test_tensor_parallel import TINY  # noqa: E402  (the suite's shape and settings, one source)


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
    p.add_argument("--layout", action="append", help="nproc:strategy:tensor_parallel (default 8:hsdp:2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", None, "data.batch_size=16")
        weights = torch.load(one / "model.pt", weights_only=True)
        for layout in args.layout or ["8:hsdp:2"]:
            nproc, strategy, tensor = layout.split(":")
            changes = [f"dist.strategy={strategy}", f"dist.tensor_parallel={tensor}"]
            if strategy == "hsdp":
                changes.append("dist.fsdp.shard_group_size=2")
            got = run(Path(tmp) / layout.replace(":", "-"), int(nproc), *changes)
            other = torch.load(got / "model.pt", weights_only=True)
            worst = max(float((other[k] - weights[k]).norm() / max(weights[k].norm(), 1e-12)) for k in weights)
            pairs = zip(rows(got), rows(one), strict=True)
            logged = max(abs(a - b) / abs(b) for mine, ref in pairs for a, b in zip(mine, ref, strict=True))
            print(f"{layout:>12}: weights {worst:.2e}, loss and gradient norm {logged:.2e} (relative, worst)")


if __name__ == "__main__":
    main()
