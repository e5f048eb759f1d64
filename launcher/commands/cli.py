"""`launcher COMMAND ...`: the parser (each command adds its own, launcher/commands/), and the one
place errors become exit codes: 0 success, 2 user error (one line on stderr), 1 anything else."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from launcher import __version__, commands
from launcher.errors import EXIT_FAILED, EXIT_USAGE, LaunchError, Preempted, RecipeError, TrainingError, UserError
from launcher.train.local import CHILD_ENV, PARENT_PID_ENV


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise LaunchError(self.prog, f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launcher", description="Train a PyTorch model from a YAML recipe, on one process or many.")
    p.add_argument("--version", action="version", version=f"launcher {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in commands.NAMES:
        module = importlib.import_module(f"launcher.commands.{name}")
        module.add_parser(sub)
        sub.choices[name].set_defaults(handler=module.main)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    # overrides may come before or after options: `run r.yaml --nproc 2 optimizer.lr=1e-3`
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        raise LaunchError(
            f"launcher {args.command}", f"unrecognized argument {unknown[0]!r}; see launcher {args.command} --help"
        )
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "recipe") and not args.recipe:
        raise LaunchError(
            f"launcher {args.command}",
            f"which recipe? e.g. launcher {args.command} recipes/quickstart.yaml [key.path=value ...]",
        )
    return args


def main(argv: list[str] | None = None) -> int:
    # components named in a recipe may live in the directory it is run from, as with `python -m`
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from launcher.observe.logs import setup_logging

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
    if exc is not None:
        from launcher.cluster import causes

        causes.record(exc, code)
    if _rank() == 0 and not os.environ.get(CHILD_ENV):  # the main process of the job
        print(line, file=sys.stderr, flush=True)
    return code


def _rank() -> int:
    """This process's rank in its job, from whichever launcher started it (0 if none, or unreadable)."""
    from launcher.cluster.env import ClusterEnv

    try:
        return ClusterEnv.detect().rank
    except UserError:
        return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


__all__ = ["main", "RecipeError", "LaunchError"]


def entry() -> None:
    """The `launcher` console script: `record` lets torchrun report a worker's exception as the root cause."""
    from launcher.observe import startup

    startup.mark("python")
    if os.environ.get(PARENT_PID_ENV, "").isdigit():  # a worker of `launcher run --nproc`: die with it
        from launcher.cluster.signals import die_with_parent

        die_with_parent(int(os.environ[PARENT_PID_ENV]))
    import torch  # noqa: F401

    startup.mark("torch")
    from torch.distributed.elastic.multiprocessing.errors import record

    code = record(main)()
    from launcher.cluster.distributed import must_exit_now

    if must_exit_now():  # the process group would not close: exiting normally would wait for it again
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
