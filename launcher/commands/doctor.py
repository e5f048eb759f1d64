"""`launcher doctor`: check a launch before training on it. Start it exactly as the job would be
started (torchrun, srun, `launcher doctor --nproc N`); rank 0 prints one table; exit 1 on any failure.

Every rank first checks in on a TCPStore under its own key, so when the group cannot form, rank 0
can name the ranks that never arrived; the process group then forms on the same store.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from launcher.cluster.distributed import pick_backend
from launcher.cluster.env import ClusterEnv
from launcher.commands import positive
from launcher.errors import LaunchError


def _versions() -> str:
    parts = [f"torch {torch.__version__}", "gloo (bundled with torch)"]
    if torch.cuda.is_available():
        parts.append(f"cuda {torch.version.cuda}")
        try:
            parts.append("nccl " + ".".join(map(str, torch.cuda.nccl.version())))
        except Exception:  # noqa: BLE001 - a version string is not worth failing the doctor
            parts.append("nccl unknown")
    return ", ".join(parts)


OPTIONAL = ("torchvision", "transformers", "datasets", "tokenizers", "safetensors", "peft", "wandb")
NEED_TRANSFORMERS_TORCH = ("transformers", "peft")  # what transformers' PyTorch support must be on for


def _optional_stack() -> list[tuple[str, bool, str]]:
    """Import each optional package that is installed: one that is installed but broken (a
    torchvision built for another torch breaks transformers too) is a failed check, with its cause."""
    import importlib
    import importlib.metadata
    import importlib.util

    from launcher.recipe.components import first_line, root_cause, transformers_torch_off
    from launcher.recipe.installed import blames_torchvision

    installed, broken = [], []
    torch_off = transformers_torch_off()
    for name in OPTIONAL:
        if importlib.util.find_spec(name) is None:
            continue
        if torch_off is not None and name in NEED_TRANSFORMERS_TORCH:
            # not broken, only unusable with this torch (the ddp path on an old torch is supported)
            installed.append(f"{name} {importlib.metadata.version(name)} (unusable, see below)")
            continue
        try:
            module = importlib.import_module(name)
            if name == "transformers":
                module.GPT2LMHeadModel  # noqa: B018 - its lazy import is where a broken dependency shows
            installed.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            cause = blames_torchvision(e)
            if cause is not None and name != "torchvision":  # said with the fix on torchvision's own row
                cause = "fails because torchvision does not match torch (see import torchvision)"
            broken.append((f"import {name}", False, cause or f"{type(e).__name__}: {first_line(e)}{root_cause(e)}"))
    found = [("optional packages", True, ", ".join(installed) or "none installed"), *broken]
    return found + ([("transformers on torch", True, torch_off)] if torch_off is not None else [])


def _agent_serves_store(env: ClusterEnv) -> bool:
    """torchrun's agent serves a store at MASTER_ADDR:PORT for its workers (unless told not to share it)."""
    return env.source == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _store(env: ClusterEnv, timeout: timedelta) -> dist.Store:
    host_it = env.is_main and not _agent_serves_store(env)
    if env.master_port is None:
        raise LaunchError("MASTER_PORT", "is not set; start doctor under torchrun or srun, or with --nproc N")
    return dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, is_master=host_it, timeout=timeout, wait_for_workers=False
    )


def run(env: ClusterEnv, backend_request: str = "auto", timeout_s: float = 30.0) -> int:
    checks: list[tuple[str, bool, str]] = []
    try:
        backend, device = pick_backend(backend_request, env.local_rank, env.local_world_size, env.gpu_bound)
        checks.append(("backend", True, f"{backend} on {device}"))
    except LaunchError as e:
        backend, device = "gloo", torch.device("cpu")
        checks.append(("backend", False, e.message))
    available = {name: getattr(dist, f"is_{name}_available")() for name in ("nccl", "gloo", "mpi")}
    checks.append(
        (
            "backends built in",
            available["gloo"],
            ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in available.items()),
        )
    )
    checks.append(("versions", True, _versions()))
    if env.is_main:  # every rank runs the same installation; importing it all takes seconds
        checks += _optional_stack()
    me: dict[str, Any] = {
        "rank": env.rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "local_rank": env.local_rank,
        "device": str(device),
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if not env.is_distributed and env.source == "single":
        checks.append(("process group", True, "none needed: one process (start the doctor as your job starts)"))
        return _report(env, [me], checks)
    try:
        ip = socket.getaddrinfo(env.master_addr, env.master_port, proto=socket.IPPROTO_TCP)[0][4][0]
        checks.append(("master address", True, f"{env.master_addr} -> {ip}"))
    except OSError as e:
        checks.append(("master address", False, f"{env.master_addr} does not resolve ({e}); set MASTER_ADDR"))
        return _report(env, [me], checks)
    timeout = timedelta(seconds=timeout_s)
    t0 = time.perf_counter()
    try:
        store = _store(env, timeout)
    except (RuntimeError, OSError) as e:
        what = "is in use by another process" if "address already in use" in str(e).lower() else "cannot be reached"
        checks.append(("master port", False, f"{env.master_addr}:{env.master_port} {what}: {str(e).splitlines()[0]}"))
        return _report(env, [me], checks)
    checks.append(
        (
            "master port",
            True,
            f"{env.master_port} "
            + ("(served by torchrun's agent)" if _agent_serves_store(env) else "(rank 0 serves the store)"),
        )
    )
    store.set(f"doctor/{env.rank}", me["host"])
    try:
        store.wait([f"doctor/{r}" for r in range(env.world_size)], timeout)
    except RuntimeError:
        missing = [r for r in range(env.world_size) if not store.check([f"doctor/{r}"])]
        checks.append(
            (
                "ranks joined",
                False,
                f"rank(s) {', '.join(map(str, missing))} did not join within {timeout_s:g}s "
                "(not started, or cannot reach the master address)",
            )
        )
        return _report(env, [me], checks)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("launcher-doctor", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    # Tensors given to gloo stay referenced here until the group is gone. torch < 2.8 destroys a
    # process group holding the GIL and joins gloo's threads; a thread that then drops the last
    # reference to a tensor needs the GIL to free it: a deadlock (pytorch/pytorch#154976).
    keep: list[torch.Tensor] = []
    try:
        control = dist.new_group(backend="gloo")  # made now: after a failure it could not be
        assert isinstance(control, dist.ProcessGroup)  # this rank is in it
        checks.append(
            ("process group", True, f"{backend}, {env.world_size} ranks, formed in {time.perf_counter() - t0:.2f} s")
        )
        checks.append(_timed_all_reduce(env, device, control, timeout_s, keep))
        # the table's rows go through the store, not a collective: no tensor is left with gloo's threads
        store.set(f"doctor/row/{env.rank}", json.dumps(me))
        if not env.is_main:
            return _report(env, [me], checks)
        store.wait([f"doctor/row/{r}" for r in range(env.world_size)], timeout)
        return _report(env, [json.loads(store.get(f"doctor/row/{r}")) for r in range(env.world_size)], checks)
    finally:
        dist.destroy_process_group()
        keep.clear()


def _timed_all_reduce(
    env: ClusterEnv, device: torch.device, control: dist.ProcessGroup, timeout_s: float, keep: list[torch.Tensor]
) -> tuple[str, bool, str]:
    numel = (64 if device.type == "cuda" else 4) * 2**20 // 4
    warm, x = torch.ones(1, device=device), torch.ones(numel, device=device)
    keep += [warm, x]
    try:
        dist.all_reduce(warm)  # warm-up: connections are set up lazily
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    except RuntimeError as e:
        from launcher.cluster.distributed import missing_ranks

        return ("all_reduce", False, f"failed: {str(e).splitlines()[0]}; {missing_ranks(control, env.rank, timeout_s)}")
    ok = bool((x == env.world_size).all())
    mib = numel * 4 / 2**20
    return (
        "all_reduce",
        ok,
        f"{mib:.0f} MiB in {dt * 1e3:.1f} ms ({mib / 1024 / dt:.2f} GiB/s)" + ("" if ok else ", WRONG RESULT"),
    )


def _report(env: ClusterEnv, rows: list[dict], checks: list[tuple[str, bool, str]]) -> int:
    failed = [c for c in checks if not c[1]]
    if not env.is_main:
        return 1 if failed else 0
    lines = [f"launcher doctor: world size {env.world_size}, started by {env.source}"]
    lines.append(f"  {'rank':<5} {'host':<20} {'pid':<8} {'local':<6} {'device':<8} gpus visible")
    for r in rows:
        lines.append(
            f"  {r['rank']:<5} {r['host'][:20]:<20} {r['pid']:<8} {r['local_rank']:<6} {r['device']:<8} "
            f"{r['gpus_visible']}"
        )
    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name:<{width}}  {detail}")
    lines.append("all checks passed" if not failed else f"{len(failed)} check(s) failed")
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = sub.add_parser(
        "doctor",
        help="check backends, devices, addresses and an all_reduce across the job",
        description="Start it the way the job is started (torchrun, srun, or --nproc N); "
        "rank 0 prints a table. Exits 1 if any check fails.",
    )
    doc.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local ranks")
    doc.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    doc.add_argument("--timeout-s", type=float, default=30.0, help="how long to wait for every rank (default 30)")


def main(args: argparse.Namespace) -> int:
    positive(args.nproc, "--nproc")
    if args.nproc is not None:
        from launcher.train.local import elastic

        return elastic(["doctor", "--backend", args.backend, "--timeout-s", str(args.timeout_s)], args.nproc)
    return run(ClusterEnv.detect(), args.backend, args.timeout_s)
