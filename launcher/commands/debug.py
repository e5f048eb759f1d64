"""`launcher debug RECIPE`: a few steps in one process with anomaly detection and per-step timing,
into RUN_DIR/debug; `--distributed`: 2 local ranks with torch's distributed debug logging;
`--simulate-world-size N`: one process computes exactly what N ranks would."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.commands import add_recipe_arguments, positive
from launcher.errors import EXIT_OK
from launcher.observe.logs import log

# `launcher debug` evaluates on this many validation batches per rank: a check that evaluation runs, not a score
DEBUG_EVAL_BATCHES = 4

_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))(torch.ones(1, 2)).sum().backward()
dist.destroy_process_group()
"""


def distributed_debug_level() -> str:
    """DETAIL, if DDP survives it in this torch: 2.14 segfaults constructing DDP on gloo under DETAIL
    (a torch bug; found by this probe, which costs one 2-process start-up). Otherwise INFO."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(_PROBE)
        env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(probe)]
        try:
            ok = subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    if not ok:
        import torch

        log.warning(f"TORCH_DISTRIBUTED_DEBUG=DETAIL crashes DDP with torch {torch.__version__} here; using INFO")
    return "DETAIL" if ok else "INFO"


def add_parser(sub: argparse._SubParsersAction) -> None:
    dbg = sub.add_parser(
        "debug",
        help="a few steps in one process, with anomaly detection and per-step timing",
        description="Run a few steps of RECIPE in one process (one GPU or the CPU) with autograd anomaly "
        "detection, num_workers=0, and timing and memory for every step, into RUN_DIR/debug. "
        "--distributed: 2 ranks with TORCH_DISTRIBUTED_DEBUG=DETAIL. --simulate-world-size N: "
        "one process reproduces the arithmetic of an N-rank run exactly.",
    )
    add_recipe_arguments(dbg)
    dbg.add_argument("--steps", type=int, default=5, help="optimizer steps to run (default 5)")
    mode = dbg.add_mutually_exclusive_group()
    mode.add_argument("--distributed", action="store_true", help="2 local ranks, with distributed debug logging")
    mode.add_argument(
        "--simulate-world-size",
        type=int,
        default=None,
        metavar="N",
        help="one process computes exactly what N ranks would",
    )
    dbg.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)  # a worker of --distributed


def main(args: argparse.Namespace) -> int:
    from launcher.recipe import schema as recipes

    positive(args.steps, "--steps")
    positive(args.simulate_world_size, "--simulate-world-size")
    recipe = recipes.load(args.recipe, args.overrides)  # the user's recipe must be valid as it is
    if args.distributed:
        from launcher.cluster.distributed import gpus_for
        from launcher.train.local import elastic

        os.environ["TORCH_DISTRIBUTED_DEBUG"] = distributed_debug_level()
        if recipe.dist.backend != "gloo" and gpus_for(2):
            os.environ["NCCL_DEBUG"] = "INFO"
        worker_args = ["debug", "--in-job", args.recipe, *args.overrides, "--steps", str(args.steps)]
        return elastic(worker_args, 2, hang_dir=recipe.run_dir / "debug" / "hang")  # as main() below writes
    import torch

    from launcher.cluster.env import ClusterEnv
    from launcher.commands.check import check_static
    from launcher.train import assemble

    # everything it writes goes under RUN_DIR/debug: a checkpoint.dir of the recipe's own is left alone
    debug_dir = recipe.run_dir / "debug"
    debug = [
        f"train.max_steps={args.steps}",
        "data.num_workers=0",
        "log.every_n_steps=1",
        f"run.dir={debug_dir}",
        f"checkpoint.dir={debug_dir / 'checkpoints'}",
        "run.overwrite=true",
        "checkpoint.resume=none",
        "checkpoint.every_n_steps=null",
        "log.wandb=null",
        f"train.eval_max_batches={DEBUG_EVAL_BATCHES}",
    ]
    recipe = recipes.load(args.recipe, [*args.overrides, *debug])
    if args.simulate_world_size:
        check_static(recipe, args.simulate_world_size)
    if recipe.dist.tensor_parallel > 1 and args.in_job:  # DTensor has no rule for anomaly mode's NaN check
        print("autograd anomaly detection is off under tensor parallelism (DTensor does not support it)")
    else:
        torch.autograd.set_detect_anomaly(True)  # slow, and worth it: the op that produced a NaN is named
    assemble.run(recipe, ClusterEnv.detect() if args.in_job else ClusterEnv(), simulate=args.simulate_world_size)
    return EXIT_OK
