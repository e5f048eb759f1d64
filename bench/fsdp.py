"""FSDP2: the launcher's `dist.strategy: fsdp` against the same training written by hand with
`fully_shard`, one invocation, same model, data, optimizer and precision.

    python bench/fsdp.py                       # CPU: 2 ranks under gloo, a small GPT, fp32
    python bench/fsdp.py --device cuda         # every GPU of this machine (torchrun), GPT-2 small, bf16
    python bench/fsdp.py --repeat 3            # three interleaved rounds, medians

Both shard each transformer block, then the root; AdamW; a fresh process group per run. Reports
steps per second (median over windows of 5 steps, data loading included, after a warm-up; the
launcher's from its metrics rows, one per window) and rank 0's peak memory (CUDA:
max_memory_allocated; CPU: peak resident set), and the launcher's ratio to the hand-written loop.
Targets (issue #13): throughput >= 0.98x, peak memory <= 1.01x. Accelerate's and Lightning
Fabric's FSDP are not in this bench yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW = 5  # steps per timing: the launcher logs (and syncs) every WINDOW steps
SHAPES = {  # model and batch per device kind
    "cpu": {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 64, "vocab_size": 256, "batch": 4},
    "cuda": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024, "vocab_size": 50304, "batch": 8},
}


def hand_written(args: argparse.Namespace) -> None:
    """One rank of the hand-written loop (started by torchrun); rank 0 prints its result as JSON."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.datasets.synthetic import Tokens
    from launcher.losses import TokenCrossEntropy
    from launcher.models import GPT
    from launcher.models.gpt import Block

    cuda = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    s = SHAPES[args.device]
    torch.manual_seed(0)
    model = GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"]).to(device)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
    for block in model:
        if isinstance(block, Block):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    data = Tokens(
        size=s["batch"] * world * (args.steps + args.warmup), seq_len=s["seq_len"], vocab_size=s["vocab_size"]
    )
    loader = DataLoader(data, batch_size=s["batch"], sampler=DistributedSampler(data, world, rank, seed=0))
    loss_fn = TokenCrossEntropy()
    times, t0 = [], time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):  # timed as the launcher's rows are: windows of WINDOW steps, data included
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % WINDOW == 0:
            loss.item()  # as the launcher's log step: waits for the device
            if i > args.warmup:
                times.append((time.perf_counter() - t0) / WINDOW)
            t0 = time.perf_counter()
    peak = (
        torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    if rank == 0:
        print(json.dumps({"steps_per_s": 1 / statistics.median(times), "peak_bytes": peak}), flush=True)
    dist.destroy_process_group()


def run_hand_written(args: argparse.Namespace, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, "--worker", "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env()).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def run_launcher(args: argparse.Namespace, nproc: int) -> dict:
    s = SHAPES[args.device]
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model = {k: s[k] for k in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads")}
        recipe = {
            "name": "bench-fsdp",
            "model": {"_component_": "launcher.models.GPT", **model},
            "data": {
                "train": {
                    "_component_": "launcher.datasets.synthetic.Tokens",
                    "size": s["batch"] * nproc * (args.steps + args.warmup),
                    "seq_len": s["seq_len"],
                    "vocab_size": s["vocab_size"],
                },
                "batch_size": s["batch"],
            },
            "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "fused": cuda},
            "train": {"max_steps": args.steps + args.warmup, "precision": "bf16" if cuda else "fp32"},
            "dist": {"strategy": "fsdp", "fsdp": {"units": ["Block"]}},
            "log": {"every_n_steps": WINDOW, "progress": "lines"},
            "checkpoint": {"keep_last": 1},
            "run": {"dir": tmp},
        }
        path = Path(tmp) / "r.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        subprocess.run(
            [sys.executable, "-m", "launcher", "run", "--nproc", str(nproc), str(path)],
            check=True,
            capture_output=True,
            env=_env(),
        )
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "step_time_s" in r and r["step"] > args.warmup]
    peak = max(r["peak_mem_gib"] if cuda else r["max_rss_gib"] for r in timed) * 2**30
    return {"steps_per_s": 1 / statistics.median(r["step_time_s"] for r in timed), "peak_bytes": peak}


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, every GPU on CUDA)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=WINDOW, help="untimed steps first (a multiple of 5)")
    p.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; medians are reported")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return hand_written(args)
    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    runs: dict[str, list[dict]] = {"hand_written": [], "launcher": []}
    for r in range(args.repeat):  # interleaved, each one first in turn: drift on the machine hits both
        order = [("hand_written", run_hand_written), ("launcher", run_launcher)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            runs[name].append(run(args, nproc))
    hand, ours = ({k: statistics.median(x[k] for x in runs[name]) for k in runs[name][0]} for name in runs)
    result = {
        "device": args.device,
        "nproc": nproc,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "hand_written": hand,
        "launcher": ours,
        "rounds": runs,
        "throughput_ratio": ours["steps_per_s"] / hand["steps_per_s"],
        "peak_memory_ratio": ours["peak_bytes"] / hand["peak_bytes"],
    }
    print(f"{'':14}{'steps/s':>10}{'peak MiB':>12}")
    for name in ("hand_written", "launcher"):
        r = result[name]
        print(f"{name:14}{r['steps_per_s']:>10.2f}{r['peak_bytes'] / 2**20:>12.1f}")
    print(
        f"launcher / hand-written: throughput {result['throughput_ratio']:.3f}x, "
        f"peak memory {result['peak_memory_ratio']:.3f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
