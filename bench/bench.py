"""The launcher against a hand-written torch loop, HF Accelerate and Lightning Fabric, same workloads.

    python bench/bench.py                       # CUDA: ResNet-18 (batch 256) and GPT-2-small shape (batch 8)
    python bench/bench.py --device cpu --smoke  # the smallest shapes, a few steps: what CI runs
    python bench/bench.py --workloads gpt --batch 32 --ckpt-table   # checkpointing: memory against time

Every (workload, implementation, checkpointing) runs in a fresh process, one after the other, with
the same model, data (synthetic tensors in a Dataset, through a DataLoader with pinned memory and
workers), optimizer (fused AdamW), bf16 autocast and batch. Each warms up, then times
`--chunks` chunks of `--chunk` steps (synchronising at the end of each chunk) and reports the median
chunk's throughput; with `--repeat R`, everything runs R times, interleaved, and the table gives the
median and the range. Peak memory is torch.cuda.max_memory_allocated; "first step" is the time from
process start to the end of the first optimizer step. `--profile DIR` traces 5 steps after the
warm-up of each configuration with the launcher's profiler (`log.profile`, with memory), for every
implementation; bench/trace_diff.py compares two traces. The launcher runs from a recipe
(bench/recipes/), as `python -m launcher run`, and its numbers come from its own metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROFILE_STEPS = 5

WORKLOADS = {
    # name: (recipe, overrides for the device, units per sample, label)
    "resnet18": ("resnet18.yaml", "img/s"),
    "gpt": ("gpt.yaml", "tok/s"),
    "hfgpt2": ("hf_gpt2.yaml", "tok/s"),  # transformers' GPT2LMHeadModel, its own loss
}
# which implementations each workload has (transformers.Trainer trains transformers models only)
IMPLS = {"hfgpt2": ("raw", "launcher", "trainer")}
DEFAULT_IMPLS = ("raw", "launcher", "accelerate", "fabric")


def shapes(workload: str, device: str, batch: int | None, smoke: bool = False) -> dict:
    if smoke:  # --smoke checks that every implementation runs and reports: the smallest shapes that do
        if workload == "resnet18":
            return {"batch": batch or 2, "image": 32, "classes": 10, "segments": 4}
        return {"batch": batch or 2, "seq": 32, "vocab": 128, "d": 32, "layers": 1, "heads": 2, "segments": 2}
    if workload == "resnet18":
        if device == "cuda":
            return {"batch": batch or 256, "image": 32, "classes": 10, "segments": 4}
        return {"batch": batch or 16, "image": 32, "classes": 10, "segments": 4}
    vocab = 50257 if workload == "hfgpt2" else 50304  # GPT-2's; ours padded to a multiple of 64
    if device == "cuda":
        return {"batch": batch or 8, "seq": 1024, "vocab": vocab, "d": 768, "layers": 12, "heads": 12, "segments": 4}
    return {"batch": batch or 4, "seq": 64, "vocab": 256, "d": 64, "layers": 2, "heads": 2, "segments": 2}


# ---------------------------------------------------------------- workers (one process each)


def build(workload: str, s: dict, device):
    """Model, dataset, loss and units per sample, shared by every implementation."""
    import torch

    from launcher.datasets.synthetic import Images, Tokens
    from launcher.losses import TokenCrossEntropy
    from launcher.models import GPT, ResNet18

    size = s["batch"] * 64
    if workload == "hfgpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["d"], n_layer=s["layers"], n_head=s["heads"]
        )
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device)
        return model, Tokens(size, s["seq"], s["vocab"], mapping=True), None, s["seq"]
    if workload == "resnet18":
        model = ResNet18(s["classes"]).to(device).to(memory_format=torch.channels_last)
        return model, Images(size, (3, s["image"], s["image"]), s["classes"]), torch.nn.CrossEntropyLoss(), 1
    model = GPT(s["vocab"], s["seq"], s["d"], s["layers"], s["heads"]).to(device)
    return model, Tokens(size, s["seq"], s["vocab"]), TokenCrossEntropy(), s["seq"]


def loader(dataset, batch: int, device, workers: int):
    import torch

    pin = device.type == "cuda" and os.environ.get("BENCH_PIN", "1") == "1"  # BENCH_PIN=0: an experiment switch
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


def time_loop(step, batches, args, device, units_per_sample: int, batch: int) -> dict:
    """Warm up, then time `--rounds-in-process` rounds of chunks of steps; report each round's median
    chunk. `step(inputs, targets)`, or `step(batch)` for mapping batches."""
    import torch

    from launcher.observe.startup import process_start

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    it = iter(batches)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(batches)
            return next(it)

    def take_step():
        b = next_batch()
        return step(b) if isinstance(b, dict) else step(*b)

    take_step()
    sync()
    first_step = time.time() - process_start()
    for _ in range(args.warmup - 1):
        take_step()
    sync()
    if args.profile:  # the launcher's own profiler, on the same steps as the launcher's (after the warm-up)
        from launcher.observe.profiling import StepProfiler

        prof = StepProfiler(
            Path(args.profile), args.profile_name, device, start_step=0, steps=PROFILE_STEPS, memory=True
        )
        prof.after_step(0)
        for i in range(PROFILE_STEPS + 1):
            take_step()
            prof.after_step(i + 1)
        sync()
    chunk_times = []
    for _ in range(args.rounds_in_process * args.chunks):
        t0 = time.perf_counter()
        for _ in range(args.chunk):
            take_step()
        sync()
        chunk_times.append((time.perf_counter() - t0) / args.chunk)
    return {
        **per_round(chunk_times, args.chunks, batch * units_per_sample),
        "first_step_s": first_step,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def per_round(chunk_s: list[float], chunks: int, units_per_step: int) -> dict:
    """Consecutive groups of `chunks` chunk times (seconds per step): each round's median chunk,
    as throughput and step time; the first round's at the top level."""
    rounds = [statistics.median(chunk_s[i : i + chunks]) for i in range(0, len(chunk_s), chunks)]
    return {
        "throughput": units_per_step / rounds[0],
        "step_ms": rounds[0] * 1e3,
        "rounds": [{"throughput": units_per_step / r, "step_ms": r * 1e3} for r in rounds],
    }


def worker(args) -> dict:  # noqa: C901 - one branch per implementation, side by side on purpose
    import torch
    from torch.utils.checkpoint import checkpoint_sequential

    device = torch.device(args.device)
    s = shapes(args.workload, args.device, args.batch, args.smoke)
    segments = s["segments"] if args.ckpt else 0
    torch.manual_seed(0)
    if os.environ.get("BENCH_CUDNN_BENCHMARK") == "1":  # an experiment switch, off in the published runs
        torch.backends.cudnn.benchmark = True
    model, dataset, loss_fn, units = build(args.workload, s, device)
    fused = {"fused": True}  # as the launcher's recipes (CUDA, and CPU since torch 2.4)
    channels_last = args.workload == "resnet18"

    def forward(m, x):
        return checkpoint_sequential(m, segments, x, use_reentrant=False) if segments else m(x)

    if args.workload in IMPLS and args.worker not in IMPLS[args.workload]:
        raise SystemExit(f"{args.worker} is not benchmarked on {args.workload}")
    if args.worker == "trainer":
        return trainer_loop(model, dataset, args, device, units, s["batch"])
    if args.worker == "raw" and loss_fn is None:  # a transformers model: its own loss, from a mapping batch
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        fwd = torch.compile(model) if args.compile else model

        def step(batch):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fwd(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        batches = loader(dataset, s["batch"], device, args.workers)
    elif args.worker == "raw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        fwd = torch.compile(model) if args.compile else model

        def step(x, y):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(forward(fwd, x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        batches = loader(dataset, s["batch"], device, args.workers)
        if os.environ.get("BENCH_DEVICE_DATA") == "1":  # an experiment switch: one batch, already on the device
            batches = [tuple(t.to(device) for t in next(iter(batches)))]
    elif args.worker == "accelerate":
        from accelerate import Accelerator

        acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        model, opt, batches = acc.prepare(model, opt, loader(dataset, s["batch"], device, args.workers))

        def step(x, y):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                loss = loss_fn(forward(model, x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif args.worker == "fabric":
        import lightning as L

        fabric = L.Fabric(accelerator=device.type, devices=1, precision="bf16-mixed")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        model, opt = fabric.setup(model, opt)
        batches = fabric.setup_dataloaders(loader(dataset, s["batch"], device, args.workers))

        def step(x, y):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if segments:  # checkpoint_sequential needs the Sequential itself, under Fabric's autocast
                with fabric.autocast():
                    loss = loss_fn(forward(model.module, x), y)
            else:
                loss = loss_fn(model(x), y)
            fabric.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise SystemExit(f"unknown implementation {args.worker}")
    return time_loop(step, batches, args, device, units, s["batch"])


def trainer_loop(model, dataset, args, device, units_per_sample: int, batch: int) -> dict:
    """transformers.Trainer on the same model and data: bf16 autocast, fused AdamW at the same lr,
    a constant schedule, the same DataLoader settings, no saving, logging or evaluation. Steps are
    timed by a callback that synchronises at the end of each chunk, as time_loop does."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from launcher.observe.startup import process_start

    timed_steps = args.rounds_in_process * args.chunks * args.chunk
    marks: list[float] = []
    first_step: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, _control, **kwargs):  # noqa: ARG002 - Trainer's signature
            done = state.global_step - args.warmup
            if state.global_step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_step.append(time.time() - process_start())
            if done >= 0 and done % args.chunk == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=args.warmup + timed_steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch_fused",
            bf16=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=args.workers,
            dataloader_pin_memory=device.type == "cuda",
            dataloader_persistent_workers=args.workers > 0,
            dataloader_drop_last=True,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Clock()]).train()
    chunk_s = [(b - a) / args.chunk for a, b in zip(marks, marks[1:], strict=False)]
    return {
        **per_round(chunk_s, args.chunks, batch * units_per_sample),
        "first_step_s": first_step[0],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def run_launcher(args, overrides: list[str]) -> dict:
    """`python -m launcher run bench/recipes/<workload>.yaml`, and its own metrics."""
    s = shapes(args.workload, args.device, args.batch, args.smoke)
    recipe = ROOT / "bench" / "recipes" / WORKLOADS[args.workload][0]
    # with --profile, more chunks: those the profiler (and its warm-up step) runs in are not timed
    chunks = args.rounds_in_process * args.chunks + (math.ceil((PROFILE_STEPS + 1) / args.chunk) if args.profile else 0)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            f"run.dir={tmp}",
            f"log.every_n_steps={args.chunk}",
            f"train.max_steps={args.warmup + chunks * args.chunk}",
            f"data.batch_size={s['batch']}",
            f"data.num_workers={args.workers}",
            "log.progress=lines",
            f"train.compile={str(args.compile).lower()}",
        ]
        if args.workload == "hfgpt2":
            sets += [
                f"model.config.{k}={s[v]}"
                for k, v in (
                    ("vocab_size", "vocab"),
                    ("n_positions", "seq"),
                    ("n_embd", "d"),
                    ("n_layer", "layers"),
                    ("n_head", "heads"),
                )
            ]
            sets += [f"data.train.seq_len={s['seq']}", f"data.train.vocab_size={s['vocab']}"]
        if args.workload == "gpt":
            sets += [
                f"model.{k}={s[v]}"
                for k, v in (
                    ("vocab_size", "vocab"),
                    ("seq_len", "seq"),
                    ("d_model", "d"),
                    ("n_layers", "layers"),
                    ("n_heads", "heads"),
                )
            ]
            sets += [f"data.train.seq_len={s['seq']}", f"data.train.vocab_size={s['vocab']}"]
        sets += [f"data.train.size={s['batch'] * 64}"]
        if args.ckpt:
            sets.append(f"train.activation_checkpointing.segments={s['segments']}")
        if args.profile:
            sets += [
                f"log.profile.start_step={args.warmup}",
                f"log.profile.steps={PROFILE_STEPS}",
                "log.profile.memory=true",
            ]
        if args.device == "cpu":
            sets += ["train.precision=bf16", "dist.backend=gloo"]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "run", str(recipe), *sets, *overrides],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        if proc.returncode:
            raise SystemExit(f"launcher failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        startup = json.loads((Path(tmp) / "startup.json").read_text())
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            for f in (Path(tmp) / "profile").iterdir():
                shutil.copy(f, Path(args.profile) / f.name.replace("rank0", args.profile_name))
    timed = [r for r in rows if "loss" in r and r["step"] > args.warmup and not r.get("profiled")]
    units = s["seq"] if args.workload in ("gpt", "hfgpt2") else 1
    out = {
        **per_round([r["step_time_s"] for r in timed], args.chunks, s["batch"] * units),
        "first_step_s": startup["first_step_s"],
        "peak_gib": timed[-1].get("peak_mem_gib"),
        "data_wait": statistics.median(r["data_wait"] for r in timed),
        "launcher_startup_s": startup.get("launcher_s"),
    }
    if "mfu" in timed[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in timed)
    return out


# ---------------------------------------------------------------- the parent: one table


def spawn(
    args, impl: str, workload: str, ckpt: bool, compile_: bool, extra: list[str], profile_name: str | None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--workload",
        workload,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--chunk",
        str(args.chunk),
        "--chunks",
        str(args.chunks),
        "--workers",
        str(args.workers),
        "--rounds-in-process",
        str(args.rounds_in_process),
    ]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.smoke:
        cmd.append("--smoke")
    if ckpt:
        cmd.append("--with-ckpt")
    if compile_:
        cmd.append("--compile")
    cmd += [f"--set={e}" for e in extra]
    if profile_name:
        cmd += ["--profile", args.profile, "--profile-name", profile_name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(line[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workloads", default="resnet18,gpt")
    p.add_argument("--impls", default="raw,launcher,accelerate,fabric")
    p.add_argument("--ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile", action="store_true", help="also compiled GPT and GPT-2 rows (raw and launcher)")
    p.add_argument(
        "--ckpt-table", action="store_true", help="the launcher's checkpointing settings: memory against time"
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument(
        "--rounds-in-process",
        type=int,
        default=1,
        help="time this many rounds of --chunks chunks in each process, one after the other: each is a "
        "round of the table (process start-up, 10 to 20 s on a GPU machine, is paid once)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest shapes, 2 warm-up steps and 2 chunks of 2: checks, not figures",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run everything this many times, interleaved, each implementation first in turn; report medians",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help=f"also trace {PROFILE_STEPS} steps after the warm-up with torch.profiler; summaries and traces go to DIR",
    )
    p.add_argument("--json", default=None, help="also write the results here (after every group)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--with-ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-name", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.warmup, args.chunk, args.chunks, args.workers = 2, 2, 2, min(args.workers, 1)
    if args.worker:
        args.ckpt = args.with_ckpt
        result = run_launcher(args, args.set) if args.worker == "launcher" else worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.ckpt]
    runs = []  # every process's result; `rows` aggregates the repeats
    for round_ in range(args.repeat):
        for workload in args.workloads.split(","):
            for ckpt in ckpts:
                impls = [i for i in args.impls.split(",") if i in IMPLS.get(workload, DEFAULT_IMPLS)]
                first = round_ % len(impls) if impls else 0  # each goes first in turn
                impls = impls[first:] + impls[:first]
                for impl in impls:
                    runs.extend(one(args, workload, ckpt, impl, False, [], round_))
            if args.compile and workload in ("gpt", "hfgpt2"):
                for impl in ("raw", "launcher")[:: 1 if round_ % 2 == 0 else -1]:
                    runs.extend(one(args, workload, False, f"{impl} compiled", True, [], round_))
            if args.ckpt_table:
                body = shapes(workload, args.device, args.batch, args.smoke)
                n = (body["layers"] + 2) if workload == "gpt" else 10  # modules before the head
                for seg, chunks in [(0, 0), (2, 0), (4, 0), (n // 2, 0), (n, 0), (0, 8), (2, 8), (4, 8), (n, 8)]:
                    extra = [
                        f"train.activation_checkpointing.segments={seg}",
                        f"train.activation_checkpointing.head_chunks={chunks}",
                    ]
                    runs.extend(one(args, workload, f"{seg}/{chunks}", "launcher", False, extra, round_))
            if args.json:  # after every group: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"runs": runs, "rows": aggregate(runs)}, indent=1))
    print()
    print(table(aggregate(runs), args))


def one(args, workload: str, ckpt, impl: str, compile_: bool, extra: list[str], round_: int) -> list[dict]:
    """One process: a row per round it timed (--rounds-in-process)."""
    base = impl.split()[0]
    if base == "fabric" and not _has("lightning"):
        r = dict(error="skipped: lightning is not installed")
    elif base == "accelerate" and not _has("accelerate"):
        r = dict(error="skipped: accelerate is not installed")
    else:
        name = None
        if args.profile and round_ == 0:  # the first round only: one trace per configuration
            label = {True: "ckpt", False: "nockpt"}.get(ckpt, f"seg{str(ckpt).replace('/', 'h')}")
            name = f"{workload}-{label}-{impl.replace(' ', '-')}"
        r = spawn(args, base, workload, ckpt is True, compile_, extra, name)
    rounds = r.pop("rounds", None) or [{}]
    out = [
        dict(workload=workload, ckpt=ckpt, impl=impl, round=round_ * len(rounds) + k, **{**r, **part})
        for k, part in enumerate(rounds)
    ]
    for row in out:
        print(_line(row), flush=True)
    return out


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (workload, checkpointing, implementation): the median over the repeats, with the range."""
    keys = list(dict.fromkeys((r["workload"], str(r["ckpt"]), r["impl"]) for r in runs))
    rows = []
    for key in keys:
        same = [r for r in runs if (r["workload"], str(r["ckpt"]), r["impl"]) == key]
        ok = [r for r in same if "error" not in r]
        if not ok:
            rows.append(same[-1])
            continue
        row = {k: v for k, v in ok[0].items() if k != "round"}
        for field in ("throughput", "step_ms", "first_step_s", "peak_gib", "data_wait", "mfu", "launcher_startup_s"):
            values = [r[field] for r in ok if r.get(field) is not None]
            if values:
                row[field] = statistics.median(values)
        row["repeats"] = len(ok)
        if len(ok) < len(same):
            row["failed"] = [r["error"] for r in same if "error" in r]
        row["range"] = (min(r["throughput"] for r in ok), max(r["throughput"] for r in ok))
        rows.append(row)
    return rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['workload']:<9} ckpt={r['ckpt']!s:<5} {r['impl']:<18} {r['error']}"
    return f"{r['workload']:<9} ckpt={r['ckpt']!s:<5} {r['impl']:<18} {r['throughput']:>12,.0f}  {r['step_ms']:8.2f} ms"


def table(rows: list[dict], args) -> str:  # noqa: ARG001 - every report function takes the arguments
    out = [
        "| workload | checkpointing | implementation | throughput | vs hand-written | step ms | peak GiB "
        "| first step s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = WORKLOADS[r["workload"]][1]
        if "error" in r:
            out.append(f"| {r['workload']} | {r['ckpt']} | {r['impl']} | - | - | - | - | - | {r['error']} |")
            continue
        ref = next(
            (
                x
                for x in rows
                if x["workload"] == r["workload"] and x["ckpt"] == r["ckpt"] and x["impl"] == "raw" and "error" not in x
            ),
            None,
        )
        if r["impl"].endswith("compiled"):
            compiled = [x for x in rows if x["workload"] == r["workload"] and x["impl"] == "raw compiled"]
            ref = next((x for x in compiled if "error" not in x), ref)
        ratio = f"{r['throughput'] / ref['throughput']:.3f}" if ref else "-"
        notes = []
        peers = [
            x
            for x in rows
            if x["workload"] == r["workload"]
            and x["ckpt"] == r["ckpt"]
            and "error" not in x
            and x["impl"] in ("accelerate", "fabric")
        ]
        if r["impl"] == "launcher" and peers:
            best = max(peers, key=lambda x: x["throughput"])
            notes.append(f"{r['throughput'] / best['throughput']:.3f}x the fastest peer ({best['impl']})")
        if r.get("failed"):
            notes.append(f"{len(r['failed'])} run(s) failed: {r['failed'][0]}")
        if r.get("data_wait") is not None:
            notes.append(f"data wait {r['data_wait']:.1%}")
        if r.get("mfu"):
            notes.append(f"MFU {r['mfu']:.1%}")
        if r.get("launcher_startup_s") is not None:
            notes.append(f"launcher's own start-up {r['launcher_startup_s']:.2f} s")
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        spread = ""
        if r.get("repeats", 1) > 1:
            spread = f" ({r['range'][0]:,.0f} to {r['range'][1]:,.0f}, n={r['repeats']})"
        out.append(
            f"| {r['workload']} | {r['ckpt']} | {r['impl']} | {r['throughput']:,.0f} {unit}{spread} | {ratio} | "
            f"{r['step_ms']:.2f} | {peak} | {r['first_step_s']:.2f} | {', '.join(notes)} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
