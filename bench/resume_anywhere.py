"""How close a sharded checkpoint resumed at another world size or strategy gets to the
uninterrupted run (the relative difference of the final weights, largest over tensors).

    python bench/resume_anywhere.py

The recipe is tests/test_sharding.py's: the test MLP, micro-batch 2, global batch 24, 3 epochs of
2 steps, fp32 on the CPU; fsdp at 2 ranks runs start to end, and its step-2 checkpoint is resumed
at 4, 3 and 1 ranks under fsdp and at 4 under ddp. Also: fsdp at 2 ranks against one process.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "support")]

from conftest import launcher, load_weights, recipe_dict, write_recipe  # noqa: E402
from test_sharding import RESUMABLE  # noqa: E402  # the tests' recipe, exactly


def run(tmp: Path, name: str, nproc: int, **changes) -> dict:
    path = write_recipe(tmp / f"{name}.yaml", recipe_dict(**{"run.dir": str(tmp / name), **RESUMABLE, **changes}))
    proc = launcher("run", *(["--nproc", str(nproc)] if nproc > 1 else []), path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return load_weights(tmp / name)


def rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        whole = run(tmp, "whole", 2, **{"dist.strategy": "fsdp"})
        out = {"fsdp at 2 vs one process": rel(whole, run(tmp, "one", 1))}
        step = str(tmp / "whole" / "checkpoints" / "step_00000002")
        for nproc, strategy in ((4, "fsdp"), (3, "fsdp"), (1, "fsdp"), (4, "ddp")):
            resumed = run(tmp, f"{strategy}{nproc}", nproc, **{"dist.strategy": strategy, "checkpoint.resume": step})
            out[f"fsdp at 2, resumed under {strategy} at {nproc}"] = rel(resumed, whole)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
