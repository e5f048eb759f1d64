"""Context parallelism at long sequences (issue #33): the launcher's `dist.context_parallel: 2` against
the same training written by hand with torch's own `context_parallel`
(torch.distributed.tensor.experimental: ring attention through SDPA's flash or memory-efficient
kernel), in one invocation: the built-in GPT (GPT-2-small shape), the same data, initial weights,
global batch, AdamW, FSDP2 over every rank (each block, then the root) and precision.

    python bench/cp.py                          # CUDA: every GPU (2 or more), cp 2, 8192 tokens, bf16, 3 rounds
    python bench/cp.py --seq-len 16384 --nproc 4 --repeat 5 --json cp.json
    python bench/cp.py --precision fp32         # both in fp32 (the ring runs SDPA's memory-efficient kernel)
    python bench/cp.py --smoke                  # CPU: the launcher alone, a tiny GPT on 2 gloo ranks

Each rank holds a head and a tail chunk of every sequence in both (the launcher's layout, and torch's
default load balancer); the launcher all-gathers each layer's keys and values and runs SDPA under a
[T / cp, T] mask, torch passes key/value chunks around the ring under causal SDPA. The ranks of a
context-parallel group read the same sequences (data-parallel size: ranks / cp); FSDP shards over all
ranks (the launcher folds cp into its shard dimension). Reports, per implementation, the median over
interleaved rounds (a fresh process group each) of the step time (windows of 5 steps, data loading
included, after a warm-up), tokens per second (the global batch's), rank 0's peak memory
(max_memory_allocated; on CPU the peak resident set), and the loss of the last logged window (the
mean of its 5 steps, the launcher's logged loss), which should agree between the two to float
tolerance. torch's `context_parallel` runs on CUDA only (its ring attention dispatches the CUDA SDPA
kernels): on CPU the hand-written row is skipped, saying so, and the launcher's row checks that it
runs. Not measured yet: no machine with 2 GPUs has been lent (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsdp  # noqa: E402  (bench/fsdp.py: its launcher recipe, shard units, timing and summary, one source)

SHAPES = {  # the GPT and sequences per data-parallel rank a step; --seq-len and --batch override
    "cuda": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 8192, "vocab_size": 50304, "batch": 2},
    "cpu": {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 1024, "vocab_size": 256, "batch": 2},
    # --smoke: checks that the launcher's row runs and reports, not figures
    "smoke": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 64, "vocab_size": 128, "batch": 2},
}
CPU_ONLY = (  # torch 2.14.1 on CPU: "aten._scaled_dot_product_flash_attention_for_cpu.default does not have a
    # sharding strategy registered"
    "torch's context_parallel does not run on CPU (its ring attention has CUDA's SDPA kernels only): "
    "this row needs 2 or more GPUs"
)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # the last window's loss, relative: the two attentions round differently


def shape(args: argparse.Namespace) -> dict:
    s = dict(SHAPES["smoke" if args.smoke else args.device])
    s.update({k: v for k, v in (("seq_len", args.seq_len), ("batch", args.batch)) if v})
    return s


def worker(args: argparse.Namespace) -> None:
    """One rank of the hand-written loop (started by torchrun); rank 0 prints its rounds as JSON.
    At --cp 1 there is nothing to split and torch's context_parallel is not entered."""
    import torch
    import torch._dynamo  # noqa: F401  (as bench/fsdp.py: before the memory baseline, as the launcher does)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.datasets.synthetic import Tokens
    from launcher.losses import TokenCrossEntropy
    from launcher.models import GPT

    class Positioned(torch.nn.Sequential):
        """The GPT's layers, given each token's position: under context_parallel a rank holds a head and
        a tail chunk of the sequence, whose positions the embedding cannot count for itself."""

        def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            x = self[0](ids, positions)
            for layer in list(self)[1:]:  # the blocks' causal SDPA: what context_parallel replaces
                x = layer(x)
            return x

    cuda = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    dp = world // args.cp
    mesh = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("dp", "cp"))  # cp innermost, as the launcher
    s = shape(args)
    steps = args.steps * args.rounds_in_process + args.warmup
    data = Tokens(size=s["batch"] * dp * steps, seq_len=s["seq_len"], vocab_size=s["vocab_size"])
    sampler = DistributedSampler(data, dp, mesh.get_local_rank("dp"), shuffle=False)
    loader = DataLoader(data, batch_size=s["batch"], sampler=sampler)
    loss_fn = TokenCrossEntropy()
    torch.manual_seed(0)  # the launcher's initial weights: the recipe's seed, right before the model is built
    model = Positioned(*GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"]).children())
    model = fsdp._shard(model.to(device), cuda, bf16=args.precision == "bf16")  # over every rank, as dp_shard_cp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    positions = torch.arange(s["seq_len"], device=device)
    window_loss = torch.zeros((), device=device)
    times, last_loss, t0 = [], float("nan"), time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        pos = positions.expand_as(x).clone()  # a buffer of its own: context_parallel shards it in place
        with _context_parallel(mesh["cp"], [x, y, pos]):
            # this rank's tokens' mean: every rank holds as many, so the mean over ranks is the whole's
            loss = loss_fn(model(x, pos), y)
            loss.backward()  # inside: the ring attention's backward passes chunks too
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        if i % fsdp.WINDOW == 0:
            dist.all_reduce(window_loss)  # as the launcher's log step: waits for the device and the ranks
            last_loss = window_loss.item() / (fsdp.WINDOW * world)
            window_loss.zero_()
            if i > args.warmup:
                times.append((time.perf_counter() - t0) / fsdp.WINDOW)
            t0 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if cuda else fsdp._peak_rss()
    if rank == 0:
        rounds = fsdp._rounds(times, args.steps)
        print(json.dumps([{"peak_bytes": peak, "steps_per_s": r, "loss": last_loss} for r in rounds]), flush=True)
    dist.destroy_process_group()


def _context_parallel(mesh, buffers: list):  # noqa: ANN001, ANN202 (torch is imported lazily)
    """torch's context_parallel over `mesh`, splitting `buffers` along the sequence (dim 1), with the
    SDPA kernels its ring attention takes (flash, memory-efficient); nothing at cp 1."""
    if mesh.size() == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]))
    stack.enter_context(
        context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers))
    )
    return stack


def run_launcher(args: argparse.Namespace, nproc: int) -> list[dict]:
    """`launcher run` of the same training at dist.context_parallel=cp; its rounds, with the last window's loss."""
    s = shape(args)
    steps = args.steps * args.rounds_in_process + args.warmup
    recipe = fsdp.launcher_recipe(s, steps, s["batch"] * nproc // args.cp, args.device, context_parallel=args.cp)
    recipe["name"] = "bench-cp"
    recipe["train"] |= {"precision": args.precision, "loss_mean_over": "tokens"}  # cp's: a token mean adds up
    recipe["data"]["shuffle"] = False  # the hand-written loop's order (the data is random anyway)
    rows, startup = fsdp.run_recipe(recipe, nproc)
    loss = [r["loss"] for r in rows if "loss" in r][-1]
    return [{**r, "loss": loss} for r in fsdp.launcher_rounds(rows, startup, args)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where there is a GPU")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: every GPU on CUDA, 2 on CPU)")
    p.add_argument("--cp", type=int, default=2, help="context-parallel size (divides --nproc)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (a multiple of 2 x cp; CUDA default 8192)")
    p.add_argument("--batch", type=int, help="sequences per data-parallel rank a step (default 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of 5)")
    p.add_argument("--warmup", type=int, default=fsdp.WINDOW, help="untimed steps first (a multiple of 5)")
    p.add_argument("--repeat", type=int, help="rounds, interleaved; medians are reported (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--rounds-in-process", type=int, default=1, help="rounds of --steps timed in each process")
    p.add_argument("--smoke", action="store_true", help="a tiny GPT, 5 + 5 steps: checks, not figures")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.smoke:
        args.steps, args.warmup = fsdp.WINDOW, fsdp.WINDOW
    repeat = args.repeat or (3 if cuda and not args.smoke else 1)
    nproc = args.nproc or (_gpus() if cuda else 2)
    s = shape(args)
    if args.cp < 2 or nproc < args.cp or nproc % args.cp:
        where = " (the GPUs of this machine)" if cuda and not args.nproc else ""
        sys.exit(f"bench/cp.py: --cp {args.cp} must be 2 or more and divide the ranks, {nproc}{where}")
    if s["seq_len"] % (2 * args.cp):
        sys.exit(f"bench/cp.py: --seq-len {s['seq_len']} must be a multiple of 2 x cp = {2 * args.cp}")
    skipped = {} if cuda else {"hand_written": CPU_ONLY}
    order = [name for name in ("hand_written", "launcher") if name not in skipped]

    def run(name: str) -> list[dict]:
        if name == "launcher":
            return run_launcher(args, nproc)
        options = ["--worker", "--device", args.device, "--cp", str(args.cp), "--precision", args.precision]
        options += ["--seq-len", str(s["seq_len"]), "--batch", str(s["batch"]), "--steps", str(args.steps)]
        options += ["--warmup", str(args.warmup), "--rounds-in-process", str(args.rounds_in_process)]
        return fsdp.torchrun(__file__, nproc, *options, *(["--smoke"] if args.smoke else []))

    def summarise(runs: dict[str, list[dict]]) -> dict:
        tokens = s["seq_len"] * s["batch"] * nproc // args.cp  # the global batch's, a step
        head = {
            "device": args.device,
            "nproc": nproc,
            "cp": args.cp,
            "precision": args.precision,
            **fsdp.provenance(args.device),
        }
        head |= {"shape": s, "tokens_per_step": tokens, "repeat": repeat, "rounds_in_process": args.rounds_in_process}
        result = fsdp.compared(runs, "peak_bytes")  # rank 0's peak: on CPU the resident set, libraries too
        for r in result.values():
            r["tokens_per_s"] = r["steps_per_s"] * tokens
        if "launcher" in result and "hand_written" in result:
            a, b = result["launcher"]["loss"], result["hand_written"]["loss"]
            head["loss_relative_difference"] = abs(a - b) / abs(b)
        return {**head, **result, "skipped": skipped, "rounds": runs}

    result = summarise(fsdp.interleaved(order, repeat, run, summarise, args.json))
    report(result, order)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def report(result: dict, order: list[str]) -> None:
    """The table: where it ran (command, machine, torch, date), what, and a row per implementation."""
    s, cp, nproc = result["shape"], result["cp"], result["nproc"]
    print(f"# {result['command']} | {result['machine']} | torch {result['torch']} | {result['date']}")
    print(
        f"# cp {cp} over {nproc} ranks (data-parallel {nproc // cp}), GPT {s['n_layers']} x {s['d_model']}, "
        f"{result['tokens_per_step']:,} tokens a step ({s['seq_len']} x {s['batch'] * nproc // cp}), "
        f"{result['precision']}, medians of {result['repeat']} round(s) x {result['rounds_in_process']} in a process"
    )
    print(f"{'':14}{'step ms':>10}{'tokens/s':>12}{'peak MiB':>11}{'last loss':>11}{'throughput':>12}{'memory':>9}")
    for name in order:
        r = result[name]
        ratios = f"{r['throughput_ratio']:>11.3f}x{r['memory_ratio']:>8.3f}x" if "throughput_ratio" in r else ""
        row = f"{1000 / r['steps_per_s']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['peak_bytes'] / 2**20:>11.1f}"
        print(f"{name:14}{row}{r['loss']:>11.4f}{ratios}")
    for name, why in result["skipped"].items():
        print(f"{name:14}skipped: {why}")
    if "loss_relative_difference" in result:
        diff, tolerance = result["loss_relative_difference"], TOLERANCE[result["precision"]]
        verdict = "agree" if diff <= tolerance else "DIFFER"
        print(f"last loss: {verdict}, relative difference {diff:.1e} ({result['precision']} tolerance {tolerance:.0e})")


if __name__ == "__main__":
    main()
