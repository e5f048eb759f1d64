"""`launcher check --gpu-memory`'s activation estimate against a measured peak.

    python bench/memory_estimate.py [--device cpu|cuda] [key=value ...]   (overrides of recipes/gpt.yaml)

The estimate counts, on the meta device, the bytes of the tensors autograd saves for the backward
(launcher/parallel/budget.py). The measure runs the same forward for real and reads what it holds
when the forward ends: on CUDA the allocated bytes above the weights (torch.cuda.memory_allocated),
on the CPU the growth of the process's resident memory (VmRSS; glibc returns large blocks to the
system, so tensors of a few MiB and up show, small ones are noise).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_SIZE = ["train.precision=fp32", "model.n_layers=4", "data.batch_size=8"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    from launcher.commands.check import build_model_cheaply
    from launcher.data.builders import build_datasets
    from launcher.parallel import budget
    from launcher.parallel.wrap import TrainModule
    from launcher.recipe import schema
    from launcher.recipe.components import instantiate

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    recipe = schema.load(ROOT / "recipes" / "gpt.yaml", [*CPU_SIZE, *args.overrides])
    train_set, _ = build_datasets(recipe)
    one = torch.utils.data.default_collate([train_set[0]])
    micro = recipe.data.batch_size
    loss_fn = instantiate(recipe.loss, "loss")
    meta_model = build_model_cheaply(recipe)
    half = recipe.train.precision != "fp32"
    estimate = budget.activation_bytes(meta_model, loss_fn, budget.micro_batch_on_meta(one, micro), 0, 0, half)

    device = torch.device(args.device)
    with torch.device(device):
        from launcher.data.builders import build_model

        model = build_model(recipe)
    module = TrainModule(model, loss_fn).train()
    batch = tuple(t.expand(micro, *t.shape[1:]).contiguous().to(device) for t in one)
    gc.collect()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
        loss = module(batch)
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    loss.backward()
    measured = after - before
    print(
        f"gpt {' '.join([*CPU_SIZE, *args.overrides])} on {device.type}: micro-batch {micro}, "
        f"estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB held after the forward "
        f"({estimate / max(measured, 1):.2f}x)"
    )


if __name__ == "__main__":
    main()
