"""`launcher run|check ...`. Exit codes: 0 success, 2 user error (one line on stderr), 1 anything else."""
from __future__ import annotations

import argparse
import os
import sys

from launcher import __version__
from launcher.errors import LaunchError, Preempted, RecipeError, TrainingError, UserError
from launcher.local import CHILD_ENV, PARENT_PID_ENV

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# `launcher debug` evaluates on this many validation batches per rank: a check that evaluation runs, not a score
DEBUG_EVAL_BATCHES = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise LaunchError(self.prog, f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launcher", description="Train a PyTorch model from a YAML recipe, on one process or many.")
    p.add_argument("--version", action="version", version=f"launcher {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="train a recipe", description=(
        "Train RECIPE. Started plainly it runs one process; under torchrun it joins the job torchrun set up; "
        "with --nproc N it starts N local workers through torch's elastic launcher."))
    run.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. optimizer.lr=3e-4")
    run.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local worker processes")
    run.add_argument("--max-restarts", type=int, default=0, metavar="K",
                     help="with --nproc: restart the workers up to K times after a failure")

    check = sub.add_parser("check", help="validate a recipe and print the resolved config and plan",
                           description="Validate RECIPE and print the resolved config and the plan. "
                                       "Creates no process group and touches no GPU, but imports the recipe's "
                                       "components and builds its model (on the meta device) and datasets: "
                                       "a recipe is code; check only recipes you trust.")
    check.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    check.add_argument("overrides", nargs="*", metavar="key.path=value")
    check.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="plan for N ranks (default: WORLD_SIZE if set, else 1)")
    doc = sub.add_parser("doctor", help="check backends, devices, addresses and an all_reduce across the job",
                         description="Start it the way the job is started (torchrun, srun, or --nproc N); "
                                     "rank 0 prints a table. Exits 1 if any check fails.")
    doc.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local ranks")
    doc.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    doc.add_argument("--timeout-s", type=float, default=30.0, help="how long to wait for every rank (default 30)")

    dbg = sub.add_parser("debug", help="a few steps in one process, with anomaly detection and per-step timing",
                         description="Run a few steps of RECIPE in one process (one GPU or the CPU) with autograd anomaly "
                                     "detection, num_workers=0, and timing and memory for every step, into RUN_DIR/debug. "
                                     "--distributed: 2 ranks with TORCH_DISTRIBUTED_DEBUG=DETAIL. --simulate-world-size N: "
                                     "one process reproduces the arithmetic of an N-rank run exactly.")
    dbg.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    dbg.add_argument("overrides", nargs="*", metavar="key.path=value")
    dbg.add_argument("--steps", type=int, default=5, help="optimizer steps to run (default 5)")
    mode = dbg.add_mutually_exclusive_group()
    mode.add_argument("--distributed", action="store_true", help="2 local ranks, with distributed debug logging")
    mode.add_argument("--simulate-world-size", type=int, default=None, metavar="N",
                      help="one process computes exactly what N ranks would")
    dbg.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)  # a worker of --distributed

    pl = sub.add_parser("plot", help="plot loss, evaluation, lr and throughput of one or more runs",
                        description="Write a PNG of loss, evaluation metrics, lr and throughput against step; "
                                    "several run directories are overlaid.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("-o", "--output", help="the PNG to write (default: RUN_DIR/metrics.png, or ./runs.png for several runs)")

    sl = sub.add_parser("slurm", help="write an sbatch script for a recipe (and submit it)",
                        description="Render the sbatch script for RECIPE into its run directory and print its path; "
                                    "with --submit, submit it with sbatch.")
    sl.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    sl.add_argument("overrides", nargs="*", metavar="key.path=value")
    sl.add_argument("--mode", choices=["torchrun", "per-gpu"], default="torchrun",
                    help="torchrun: one torchrun per node starts the workers (default); per-gpu: one SLURM task per GPU")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs to request per node; 0 for CPU-only nodes")
    sl.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)")
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit, e.g. 24:00:00")
    sl.add_argument("--account")
    sl.add_argument("--job-name", help="default: the recipe's name")
    sl.add_argument("--cpus-per-task", type=int, default=None)
    sl.add_argument("--grace-s", type=int, default=120, help="seconds between the preemption warning and the time limit")
    sl.add_argument("--python", help="the Python with launcher installed, as the nodes see it (default: this one)")
    sl.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    for name, parser in sub.choices.items():
        parser.set_defaults(handler=globals()[f"cmd_{name}"])
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    # overrides may come before or after options: `run r.yaml --nproc 2 optimizer.lr=1e-3`
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        raise LaunchError(f"launcher {args.command}", f"unrecognized argument {unknown[0]!r}; see launcher {args.command} --help")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "recipe") and not args.recipe:
        raise LaunchError(f"launcher {args.command}", f"which recipe? e.g. launcher {args.command} recipes/quickstart.yaml "
                                                     "[key.path=value ...]")
    return args


def main(argv: list[str] | None = None) -> int:
    # components named in a recipe may live in the directory it is run from, as with `python -m`
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from launcher.logs import setup_logging

    setup_logging(_rank())  # warnings before training starts are marked and go to stderr too
    try:
        args = _parse(argv)
        return args.handler(args)
    except UserError as e:
        _traceback_if_debugging()
        return report(e, f"error: {e}", EXIT_USAGE)
    except TrainingError as e:
        _traceback_if_debugging()
        return report(e, f"error: {e}", EXIT_FAILED)
    except Preempted as e:
        report(None, str(e), e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _traceback_if_debugging() -> None:
    """LAUNCHER_DEBUG=1: every user error also shows where it was raised."""
    if os.environ.get("LAUNCHER_DEBUG") == "1":
        import traceback
        traceback.print_exc()




def report(exc: Exception | None, line: str, code: int) -> int:
    """Print a one-line outcome once per job, and leave it in torchelastic's error file, from which
    torchrun (or our own parent) reports the root cause of a multi-process failure."""
    if exc is not None and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(exc)
    if _rank() == 0 and not os.environ.get(CHILD_ENV):
        print(line, file=sys.stderr, flush=True)
    return code


def _rank() -> int:
    """This process's rank in its job, from whichever launcher started it (0 if none, or unreadable)."""
    from launcher.env import ClusterEnv

    try:
        return ClusterEnv.detect().rank
    except UserError:
        return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise LaunchError(option, f"must be at least 1, got {value}")


def cmd_run(args) -> int:
    from launcher import recipe as recipes

    _positive(args.nproc, "--nproc")
    if args.max_restarts < 0:
        raise LaunchError("--max-restarts", f"must be 0 or more, got {args.max_restarts}")
    recipe = recipes.load(args.recipe, args.overrides)
    if args.nproc is not None:
        from launcher.local import launch_local
        return launch_local(recipe, args)
    from launcher import distributed, train
    from launcher.env import ClusterEnv

    env = ClusterEnv.detect()
    try:
        train.run(recipe, env)
    except Exception as e:
        if env.is_distributed and distributed.is_peer_failure(e):
            # the root cause is another rank's error, which it reports; no traceback, no error file here
            if not os.environ.get(CHILD_ENV):
                print(f"[rank {env.rank}] stopped: another rank failed or left ({str(e).splitlines()[0][:200]})",
                      file=sys.stderr, flush=True)
            return EXIT_FAILED
        raise
    return EXIT_OK


def cmd_check(args) -> int:
    from launcher import recipe as recipes
    from launcher.check import check_recipe

    _positive(args.nproc, "--nproc")
    recipe = recipes.load(args.recipe, args.overrides)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1") or 1)
    print(check_recipe(recipe, world))
    return EXIT_OK


def cmd_debug(args) -> int:
    from launcher import recipe as recipes

    _positive(args.steps, "--steps")
    _positive(args.simulate_world_size, "--simulate-world-size")
    recipe = recipes.load(args.recipe, args.overrides)  # the user's recipe must be valid as it is
    if args.distributed:
        from launcher.distributed import gpus_for
        from launcher.local import elastic

        from launcher.debug import distributed_debug_level
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = distributed_debug_level()
        if recipe.dist.backend != "gloo" and gpus_for(2):
            os.environ["NCCL_DEBUG"] = "INFO"
        return elastic(["debug", "--in-job", args.recipe, *args.overrides, "--steps", str(args.steps)], 2)
    import torch

    from launcher import train
    from launcher.check import check_static
    from launcher.env import ClusterEnv

    # everything it writes goes under RUN_DIR/debug: a checkpoint.dir of the recipe's own is left alone
    debug_dir = recipe.run_dir / "debug"
    debug = [f"train.max_steps={args.steps}", "data.num_workers=0", "log.every_n_steps=1", f"run.dir={debug_dir}",
             f"checkpoint.dir={debug_dir / 'checkpoints'}", "run.overwrite=true", "checkpoint.resume=none",
             "checkpoint.every_n_steps=null", "log.wandb=null", f"train.eval_max_batches={DEBUG_EVAL_BATCHES}"]
    recipe = recipes.load(args.recipe, [*args.overrides, *debug])
    if args.simulate_world_size:
        check_static(recipe, args.simulate_world_size)
    torch.autograd.set_detect_anomaly(True)  # slow, and worth it: the op that produced a NaN is named
    train.run(recipe, ClusterEnv.detect() if args.in_job else ClusterEnv(), simulate=args.simulate_world_size)
    return EXIT_OK


def cmd_plot(args) -> int:
    from pathlib import Path

    from launcher.plot import plot

    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.output) if args.output else (dirs[0] / "metrics.png" if len(dirs) == 1 else Path("runs.png"))
    plot(dirs, out)
    print(out)
    return EXIT_OK


def cmd_doctor(args) -> int:
    _positive(args.nproc, "--nproc")
    if args.nproc is not None:
        from launcher.local import elastic
        return elastic(["doctor", "--backend", args.backend, "--timeout-s", str(args.timeout_s)], args.nproc)
    from launcher import doctor
    from launcher.env import ClusterEnv
    return doctor.run(ClusterEnv.detect(), args.backend, args.timeout_s)


def cmd_slurm(args) -> int:
    from launcher import recipe as recipes
    from launcher import slurm
    from launcher.check import check_static

    nproc = args.nproc_per_node if args.nproc_per_node is not None else args.gpus_per_node
    _positive(args.nodes, "--nodes")
    _positive(nproc, "--nproc-per-node")
    if args.gpus_per_node < 0:
        raise LaunchError("--gpus-per-node", f"must be 0 or more, got {args.gpus_per_node}")
    if args.gpus_per_node and nproc > args.gpus_per_node:
        raise LaunchError("--nproc-per-node", f"{nproc} ranks per node for {args.gpus_per_node} GPUs; use at most one rank per GPU")
    recipe = recipes.load(args.recipe, args.overrides)
    check_static(recipe, args.nodes * nproc)
    text = slurm.render(recipe, args.recipe, args.overrides, mode=args.mode, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, nproc_per_node=nproc, partition=args.partition,
                        time=args.time, account=args.account, job_name=args.job_name,
                        cpus_per_task=args.cpus_per_task, grace_s=args.grace_s, python=args.python)
    path = recipe.run_dir / slurm.template_name(args.mode, args.nodes)
    job = slurm.write_and_submit(text, path, args.submit)
    print(path)
    if job:
        print(f"submitted job {job}; log: {recipe.run_dir.resolve()}/slurm-{job}.out")
    return EXIT_OK


__all__ = ["main", "RecipeError", "LaunchError"]


def entry() -> None:
    """The `launcher` console script: `record` lets torchrun report a worker's exception as the root cause."""
    from launcher import startup

    startup.mark("python")
    if os.environ.get(PARENT_PID_ENV, "").isdigit():  # a worker of `launcher run --nproc`: die with it
        from launcher.signals import die_with_parent
        die_with_parent(int(os.environ[PARENT_PID_ENV]))
    import torch  # noqa: F401

    startup.mark("torch")
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
