"""FSDP2: the launcher's `dist.strategy: fsdp` against the same training written by hand with
`fully_shard`, with Lightning Fabric (ModelParallelStrategy, its FSDP2) and with Accelerate
(`fsdp_version: 2`): one invocation, same model, data, optimizer, sharding units and precision.

    python bench/fsdp.py                       # CPU: 2 ranks under gloo, a small GPT, fp32
    python bench/fsdp.py --device cuda         # every GPU of this machine (torchrun), GPT-2 small, bf16
    python bench/fsdp.py --repeat 3            # three interleaved rounds, medians
    python bench/fsdp.py --tp 2 --nproc 4      # fsdp x tensor parallel 2 (launcher dist.tensor_parallel)
    python bench/fsdp.py --pp 2 --nproc 4      # pipeline 2 (1F1B) x fsdp 2 (launcher dist.pipeline_parallel)

Each shards every transformer block, then the root; AdamW; a fresh process group per run. Reports
steps per second (median over windows of 5 steps, data loading included, after a warm-up; the
launcher's from its metrics rows, one per window) and rank 0's peak memory, and each one's ratio to
the hand-written loop (the median over rounds of each round's ratio). Memory: on CUDA
max_memory_allocated; on CPU the peak resident set, and ("train MiB", the ratio's basis) that peak
less the peak before the model was built, which leaves out the libraries each implementation
imports. Targets (issue #13): throughput >= 0.98x, memory <= 1.01x. With `--tp N` every row also
splits each block over N ranks first (the hand-written loop: parallelize_module with the GPT's
tp_plan on the mesh's tp dimension, then fully_shard over the data-parallel one; Fabric: its
ModelParallelStrategy with tensor_parallel_size N; the launcher: dist.tensor_parallel N); a
tensor-parallel group's ranks read the same batch. Target (issue #22): >= 0.98x at equal memory.
Accelerate shards only on accelerators, so its row runs on CUDA only; rows whose package is not
installed are skipped, saying so. With `--pp N` (issue #32) the model is split into N stages
(embeddings and the first blocks, ..., the last blocks, norm and head), each sharded over the
data-parallel ranks: the hand-written loop builds torch's PipelineStage per stage and runs
Schedule1F1B over 2N micro-batches a step (equal-length sequences, so torch's own loss scaling is
exact); the launcher runs dist.pipeline_parallel N, schedule 1f1b, the same micro-batches. Fabric and
Accelerate have no pipeline here and are skipped. Target: >= 0.98x at equal memory, on a machine with
several GPUs (not run yet: none has been lent; on CPU it checks that both rows run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW = 5  # steps per timing: the launcher logs (and syncs) every WINDOW steps
SHAPES = {  # model and batch per device kind
    "cpu": {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 64, "vocab_size": 256, "batch": 4},
    "cuda": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024, "vocab_size": 50304, "batch": 8},
    # --smoke (on CPU): checks that every implementation runs and reports, not figures; 2 blocks, so
    # that there are several units to shard before the root
    "smoke": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "vocab_size": 128, "batch": 2},
}


IMPLS = ("hand_written", "fabric", "accelerate")  # each runs as torchrun workers of this file


def worker(args: argparse.Namespace) -> None:
    """One rank of a non-launcher implementation (started by torchrun); rank 0 prints its result as JSON."""
    import torch
    import torch._dynamo  # noqa: F401  (building any optimizer imports it: before the memory baseline, as the launcher does)
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.datasets.synthetic import Tokens
    from launcher.losses import TokenCrossEntropy
    from launcher.models import GPT

    cuda = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.pp > 1:
        return _pipeline_worker(args)
    dp, dp_rank = world // args.tp, rank // args.tp  # a tensor-parallel group's ranks read the same batch
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    s = SHAPES["smoke" if args.smoke else args.device]
    steps = args.steps * args.rounds_in_process + args.warmup
    data = Tokens(size=s["batch"] * dp * steps, seq_len=s["seq_len"], vocab_size=s["vocab_size"])
    loader = DataLoader(data, batch_size=s["batch"], sampler=DistributedSampler(data, dp, dp_rank, seed=0))
    loss_fn = TokenCrossEntropy()
    torch.manual_seed(0)
    if args.worker == "hand_written":
        dist.init_process_group("nccl" if cuda else "gloo")
        rss_before_model = _peak_rss()
        model = GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"]).to(device)
        model = _shard(_split(model, _mesh(cuda, args.tp)), cuda, _mesh(cuda, args.tp)["dp_shard"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        backward = torch.Tensor.backward
    elif args.worker == "fabric":  # Fabric's FSDP2 is ModelParallelStrategy (its FSDPStrategy is FSDP1)
        import lightning as L
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            parallelize_fn=lambda m, mesh: _shard(_split(m, mesh), cuda, mesh["data_parallel"]),
            data_parallel_size=dp,
            tensor_parallel_size=args.tp,
        )
        fabric = L.Fabric(accelerator=device.type, devices=world, strategy=strategy, precision="32-true")
        fabric.launch()  # torchrun started the processes: this only sets up the process group
        rss_before_model = _peak_rss()
        model = GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"])
        model = fabric.setup_module(model)
        opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda))
        backward = fabric.backward
    else:  # Accelerate, FSDP2: the same units and policy; it shards only on accelerators (on CPU it is DDP)
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
            reshard_after_forward=True,
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=_param_dtype(cuda), reduce_dtype=torch.float32),
        )
        acc = Accelerator(fsdp_plugin=plugin, mixed_precision="no")
        rss_before_model = _peak_rss()
        model = GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        model, opt = acc.prepare(model, opt)  # the loader stays ours: the same DistributedSampler shards
        backward = acc.backward
    times, t0 = [], time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):  # timed as the launcher's rows are: windows of WINDOW steps, data included
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % WINDOW == 0:
            loss.item()  # as the launcher's log step: waits for the device
            if i > args.warmup:
                times.append((time.perf_counter() - t0) / WINDOW)
            t0 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss()
    if rank == 0:
        result = {"peak_bytes": peak}
        if not cuda:  # the process's own libraries left out: what training added
            result["train_bytes"] = peak - rss_before_model
        print(json.dumps([{**result, "steps_per_s": r} for r in _rounds(times, args.steps)]), flush=True)
    dist.destroy_process_group()


def _pipeline_worker(args: argparse.Namespace) -> None:
    """The hand-written pipeline: pp stages (the outer mesh dimension) x fully_shard over the data-parallel
    ranks, torch's PipelineStage and Schedule1F1B, 2 pp micro-batches of `batch` sequences a step."""
    import torch
    import torch._dynamo  # noqa: F401  (as worker())
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.datasets.synthetic import Tokens
    from launcher.losses import TokenCrossEntropy
    from launcher.models import GPT

    cuda = args.device == "cuda"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dp = world // args.pp
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (args.pp, dp), mesh_dim_names=("pp", "dp_shard"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp_shard")
    s = SHAPES["smoke" if args.smoke else args.device]
    n_micro, steps = 2 * args.pp, args.steps * args.rounds_in_process + args.warmup
    data = Tokens(size=s["batch"] * n_micro * dp * steps, seq_len=s["seq_len"], vocab_size=s["vocab_size"])
    sampler = DistributedSampler(data, dp, dp_rank, seed=0)
    loader = DataLoader(data, batch_size=s["batch"] * n_micro, sampler=sampler)
    torch.manual_seed(0)
    rss_before_model = _peak_rss()
    whole = GPT(s["vocab_size"], s["seq_len"], s["d_model"], s["n_layers"], s["n_heads"])
    children = list(whole.children())  # embedding, blocks..., norm, head
    blocks = children[1:-2]
    per = -(-len(blocks) // args.pp)
    mine = blocks[pp_rank * per : (pp_rank + 1) * per]
    parts = ([children[0]] if pp_rank == 0 else []) + mine + (children[-2:] if pp_rank == args.pp - 1 else [])
    stage_module = _shard(torch.nn.Sequential(*parts).to(device), cuda, mesh["dp_shard"])
    stage = PipelineStage(stage_module, pp_rank, args.pp, device, group=mesh["pp"].get_group())
    schedule = Schedule1F1B(stage, n_microbatches=n_micro, loss_fn=TokenCrossEntropy())
    opt = torch.optim.AdamW(stage_module.parameters(), lr=1e-4, fused=cuda)
    first, last = pp_rank == 0, pp_rank == args.pp - 1
    times, t0 = [], time.perf_counter()
    for i, (x, y) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        schedule.step(*([x] if first else []), target=y if last else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % WINDOW == 0:
            if cuda:
                torch.cuda.synchronize(device)  # as the launcher's log step: waits for the device
            if i > args.warmup:
                times.append((time.perf_counter() - t0) / WINDOW)
            t0 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss()
    if rank == 0:
        result = {"peak_bytes": peak}
        if not cuda:
            result["train_bytes"] = peak - rss_before_model
        print(json.dumps([{**result, "steps_per_s": r} for r in _rounds(times, args.steps)]), flush=True)
    dist.destroy_process_group()


def _param_dtype(cuda: bool):  # noqa: ANN202 (torch is imported lazily)
    import torch

    return torch.bfloat16 if cuda else None


def _mesh(cuda: bool, tp: int):  # noqa: ANN202
    """dp_shard x tp, the tensor dimension innermost, as the launcher lays its ranks out (cached: one per process)."""
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        world = int(os.environ["WORLD_SIZE"])
        _MESH = init_device_mesh("cuda" if cuda else "cpu", (world // tp, tp), mesh_dim_names=("dp_shard", "tp"))
    return _MESH


_MESH = None


def _split(model, mesh):  # noqa: ANN001, ANN202
    """The GPT's tensor-parallel plan (column- then row-wise), as the launcher applies it; none at tp 1."""
    import fnmatch

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = mesh["tp"] if "tp" in (mesh.mesh_dim_names or ()) else mesh["tensor_parallel"]
    if tp_mesh.size() == 1:
        return model
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {
        name: styles[style]()
        for name, _ in model.named_modules()
        for pattern, style in model.tp_plan.items()
        if fnmatch.fnmatchcase(name, pattern)
    }
    return parallelize_module(model, tp_mesh, plan)


def _shard(model, cuda: bool, mesh=None, bf16: bool | None = None):  # noqa: ANN001, ANN202
    """Each transformer block, then the root, as the launcher's `units: [Block]` does; bf16 parameters
    in the forward and backward on CUDA (`bf16` says otherwise), fp32 gradient reduction."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from launcher.models.gpt import Block

    if mesh is None:
        mesh = init_device_mesh("cuda" if cuda else "cpu", (int(os.environ["WORLD_SIZE"]),))
    policy = MixedPrecisionPolicy(param_dtype=_param_dtype(cuda if bf16 is None else bf16), reduce_dtype=torch.float32)
    for block in model:
        if isinstance(block, Block):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rounds(window_s: list[float], steps: int) -> list[float]:
    """Steps per second of each round: consecutive groups of `steps` / WINDOW windows, each's median."""
    n = max(1, steps // WINDOW)
    return [1 / statistics.median(window_s[i : i + n]) for i in range(0, len(window_s), n)]


def run_worker(name: str, args: argparse.Namespace, nproc: int) -> list[dict]:
    options = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    options += ["--tp", str(args.tp), "--rounds-in-process", str(args.rounds_in_process), "--pp", str(args.pp)]
    return torchrun(__file__, nproc, "--worker", name, *options, *(["--smoke"] if args.smoke else []))


def torchrun(script: str, nproc: int, *options: str) -> list[dict]:
    """`script`'s workers on `nproc` ranks; the last JSON list rank 0 printed (its rounds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script]
    out = subprocess.run([*cmd, *options], check=True, capture_output=True, text=True, env=_env()).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("[{")][-1])


def run_launcher(args: argparse.Namespace, nproc: int) -> list[dict]:
    s = SHAPES["smoke" if args.smoke else args.device]
    steps = args.steps * args.rounds_in_process + args.warmup
    recipe = launcher_recipe(
        s, steps, s["batch"] * nproc // args.tp, args.device, tensor_parallel=args.tp, pipeline_parallel=args.pp
    )
    if args.pp > 1:  # 2 pp micro-batches of `batch` a step on each data-parallel rank, as the hand-written loop
        per_step = s["batch"] * 2 * args.pp * (nproc // args.pp)
        recipe["train"]["global_batch_size"] = per_step
        recipe["data"]["train"]["size"] = per_step * steps
    rows, startup = run_recipe(recipe, nproc)
    return launcher_rounds(rows, startup, args)


def launcher_recipe(s: dict, steps: int, samples_per_step: int, device: str, **dist: object) -> dict:
    """The launcher's recipe for shape `s`: `steps` steps of `samples_per_step` samples of the GPT, FSDP2
    over its blocks, AdamW; `dist`: more of the recipe's dist section."""
    cuda = device == "cuda"
    model = {k: s[k] for k in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads")}
    return {
        "name": "bench-fsdp",
        "model": {"_component_": "launcher.models.GPT", **model},
        "data": {
            "train": {
                "_component_": "launcher.datasets.synthetic.Tokens",
                "size": samples_per_step * steps,
                "seq_len": s["seq_len"],
                "vocab_size": s["vocab_size"],
            },
            "batch_size": s["batch"],
        },
        "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "fused": cuda},
        "train": {"max_steps": steps, "precision": "bf16" if cuda else "fp32"},
        "dist": {"strategy": "fsdp", "fsdp": {"units": ["Block"]}, **dist},
        "log": {"every_n_steps": WINDOW, "progress": "lines"},
        "checkpoint": {"keep_last": 1},
    }


def run_recipe(recipe: dict, nproc: int) -> tuple[list[dict], dict]:
    """`launcher run --nproc nproc` of `recipe` in a fresh run directory: its metrics rows and startup.json."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(json.dumps({**recipe, "run": {"dir": tmp}}))  # JSON is YAML
        subprocess.run(
            [sys.executable, "-m", "launcher", "run", "--nproc", str(nproc), str(path)],
            check=True,
            capture_output=True,
            env=_env(),
        )
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        return rows, json.loads((Path(tmp) / "startup.json").read_text())


def launcher_rounds(rows: list[dict], startup: dict, args: argparse.Namespace) -> list[dict]:
    """Each round's steps per second and peak memory, from the launcher's rows after the warm-up."""
    cuda = args.device == "cuda"
    timed = [r for r in rows if "step_time_s" in r and r["step"] > args.warmup]
    peak = max(r["peak_mem_gib"] if cuda else r["max_rss_gib"] for r in timed) * 2**30
    result = {"peak_bytes": peak}
    if not cuda:
        result["train_bytes"] = peak - startup["peak_rss_before_model_mib"] * 2**20
    return [{**result, "steps_per_s": r} for r in _rounds([r["step_time_s"] for r in timed], args.steps)]


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
    p.add_argument(
        "--rounds-in-process",
        type=int,
        default=1,
        help="time this many rounds of --steps in each process, one after the other (start-up paid once)",
    )
    p.add_argument("--impls", default="hand_written,launcher,fabric,accelerate", help="comma-separated")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (divides --nproc)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (divides --nproc; not with --tp)")
    p.add_argument("--smoke", action="store_true", help="the smallest model and batch: checks, not figures")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    impls = [name for name in args.impls.split(",") if name]
    skipped = {name: why for name in impls if (why := _skip_reason(name, args.device, args.tp, args.pp))}
    order = [name for name in impls if name not in skipped]
    runs = interleaved(
        order,
        args.repeat,
        lambda name: run_launcher(args, nproc) if name == "launcher" else run_worker(name, args, nproc),
        lambda runs: summary(runs, skipped, args, nproc),
        args.json,
    )
    result = summary(runs, skipped, args, nproc)
    print(f"{'':14}{'steps/s':>10}{'peak MiB':>12}{'train MiB':>11}{'throughput':>12}{'memory':>9}")
    for name in runs:
        r = result[name]
        train = f"{r['train_bytes'] / 2**20:>11.1f}" if "train_bytes" in r else f"{'':>11}"
        ratios = f"{r['throughput_ratio']:>11.3f}x{r['memory_ratio']:>8.3f}x" if "throughput_ratio" in r else ""
        print(f"{name:14}{r['steps_per_s']:>10.2f}{r['peak_bytes'] / 2**20:>12.1f}{train}{ratios}")
    for name, why in skipped.items():
        print(f"{name:14}skipped: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def interleaved(
    order: list[str],
    repeat: int,
    run: Callable[[str], list[dict]],
    summarise: Callable[[dict[str, list[dict]]], dict],
    json_path: str | None,
) -> dict[str, list[dict]]:
    """Each implementation's rounds: `repeat` runs of each, interleaved, in turn reversed (drift on the
    machine hits every one alike); with `json_path`, the summary written there after each run (a
    run cut short keeps what it measured)."""
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for r in range(repeat):
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name] += run(name)
            if json_path:
                Path(json_path).write_text(json.dumps(summarise(runs), indent=1) + "\n")
    return runs


def summary(runs: dict[str, list[dict]], skipped: dict[str, str], args: argparse.Namespace, nproc: int) -> dict:
    """Medians over rounds, and each implementation's ratios to the hand-written loop."""
    head = {"device": args.device, "nproc": nproc, "tp": args.tp, "pp": args.pp, **provenance(args.device)}
    memory = "train_bytes" if args.device == "cpu" else "peak_bytes"
    return {**head, **compared(runs, memory), "skipped": skipped, "rounds": runs}


def compared(runs: dict[str, list[dict]], memory: str) -> dict:
    """Each implementation's medians over its rounds, and its ratios to the hand-written loop's
    (throughput from steps_per_s, memory from the key `memory`)."""
    done = {name: rounds for name, rounds in runs.items() if rounds}
    result = {name: {k: statistics.median(x[k] for x in rounds) for k in rounds[0]} for name, rounds in done.items()}
    base = done.get("hand_written")
    for name, rounds in done.items():
        if base is None:
            continue
        # each round's ratio to that round's hand-written run, then their median: drift on a
        # shared machine moves a round's runs together, so pairs cancel most of it
        pairs = list(zip(rounds, base, strict=False))
        result[name]["throughput_ratio"] = statistics.median(a["steps_per_s"] / b["steps_per_s"] for a, b in pairs)
        result[name]["memory_ratio"] = statistics.median(a[memory] / b[memory] for a, b in pairs)
    return result


def provenance(device: str) -> dict:
    """What every result carries: the command that made it, the machine, torch, the date (UTC). Imports
    torch only for a CUDA machine's GPUs (a CPU run's parent process then starts faster)."""
    import importlib.metadata
    import platform

    if device == "cuda":
        import torch

        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), no CUDA used"
    imported = sys.modules.get("torch")  # its version has the local label (+cu130), the package's has not
    version = imported.__version__ if imported else importlib.metadata.version("torch")
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script)
    return {
        "command": shlex.join(["python", shown, *sys.argv[1:]]),
        "machine": machine,
        "torch": version,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def _skip_reason(name: str, device: str, tp: int = 1, pp: int = 1) -> str | None:
    import importlib.util

    if name in ("fabric", "accelerate") and pp > 1:
        return "this bench gives it no pipeline (only the hand-written PipelineStage loop and the launcher have one)"
    if name == "accelerate" and tp > 1:
        return "this bench gives Accelerate no tensor-parallel plan (its ParallelismConfig needs its own model plan)"
    module = {"fabric": "lightning", "accelerate": "accelerate"}.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {module})"
    if name == "accelerate" and device == "cpu":
        return "Accelerate shards only on accelerators: on CPU its FSDP plugin is ignored and it runs DDP"
    return None


if __name__ == "__main__":
    main()
