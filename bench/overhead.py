"""Per-step host overhead of the launcher's loop, against the same step written by hand.

    python bench/overhead.py [--steps 3000]

A model so small (Linear 8 -> 16 -> 1, batch 4, CPU) that a step is almost all Python and dispatch:
the difference per step is what the launcher adds to every step of every run (here with a metrics
row every 100 steps, and no checkpoint, scheduler or clipping).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hand_written(steps: int) -> float:
    import torch

    from launcher.datasets.synthetic import Regression

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(Regression(size=4 * steps), batch_size=4, shuffle=True)
    loss_fn = torch.nn.MSELoss()
    it = iter(data)
    for _ in range(100):  # warm-up
        x, y = next(it)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(steps - 200):
        x, y = next(it)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / (steps - 200)


def launcher(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {
            "name": "overhead",
            "model": {"_component_": "launcher.models.MLP", "sizes": [8, 16, 1]},
            "data": {
                "train": {"_component_": "launcher.datasets.synthetic.Regression", "size": 4 * steps},
                "batch_size": 4,
            },
            "loss": {"_component_": "torch.nn.MSELoss"},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
            "train": {"max_steps": steps},
            "log": {"every_n_steps": 100, "progress": "lines"},
            "run": {"dir": tmp},
        }
        path = Path(tmp) / "r.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        subprocess.run(
            [sys.executable, "-m", "launcher", "run", str(path)],
            check=True,
            capture_output=True,
            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["step_time_s"] for r in rows if r["step"] > 100][:-1]  # skip the warm-up and the last row
    return sorted(timed)[len(timed) // 2]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    raw = hand_written(args.steps)
    ours = launcher(args.steps)
    print(
        f"hand-written {raw * 1e6:.0f} us/step, launcher {ours * 1e6:.0f} us/step: "
        f"the launcher adds {(ours - raw) * 1e6:.0f} us per step"
    )
