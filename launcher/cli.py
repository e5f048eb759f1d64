"""`launcher run|check ...`. Exit codes: 0 success, 2 user error (one line on stderr), 1 anything else."""
from __future__ import annotations

import argparse
import os
import sys

from launcher.errors import LaunchError, Preempted, RecipeError, TrainingError, UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise LaunchError(self.prog, f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launcher", description="Train a PyTorch model from a YAML recipe, on one process or many.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="train a recipe", description=(
        "Train RECIPE. Started plainly it runs one process; under torchrun it joins the job torchrun set up; "
        "with --nproc N it starts N local workers through torch's elastic launcher."))
    run.add_argument("recipe", help="path to the recipe YAML")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. optimizer.lr=3e-4")
    run.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local worker processes")
    run.add_argument("--max-restarts", type=int, default=0, metavar="K",
                     help="with --nproc: restart the workers up to K times after a failure")

    check = sub.add_parser("check", help="validate a recipe and print the resolved config and plan",
                           description="Validate RECIPE and print the resolved config and the plan. "
                                       "Creates no process group and touches no GPU.")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*", metavar="key.path=value")
    check.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="plan for N ranks (default: WORLD_SIZE if set, else 1)")
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
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        raise AssertionError(args.command)
    except UserError as e:
        return report(e, f"error: {e}", EXIT_USAGE)
    except TrainingError as e:
        return report(e, f"error: {e}", EXIT_FAILED)
    except Preempted as e:
        report(None, str(e), e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# set by `launcher run --nproc` for its workers: the parent prints one line for the whole job
CHILD_ENV = "LAUNCHER_CHILD"


def report(exc: Exception | None, line: str, code: int) -> int:
    """Print a one-line outcome once per job, and leave it in torchelastic's error file, from which
    torchrun (or our own parent) reports the root cause of a multi-process failure."""
    if exc is not None and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(exc)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0 and not os.environ.get(CHILD_ENV):
        print(line, file=sys.stderr, flush=True)
    return code


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


__all__ = ["main", "RecipeError", "LaunchError"]


def entry() -> None:
    """The `launcher` console script: `record` lets torchrun report a worker's exception as the root cause."""
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
