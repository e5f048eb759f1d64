"""One module per subcommand. Each has `add_parser(subparsers)` (its arguments and help) and
`main(args) -> exit code` (validate the arguments, call the layers below). `launcher.commands.cli` builds the
parser from them and turns errors into exit codes; heavy imports stay inside `main`, so that
`launcher --help` and a typo answer at once."""

from __future__ import annotations

import argparse

from launcher.errors import LaunchError

# in `launcher --help` order
NAMES = ("run", "check", "verify", "doctor", "debug", "plot", "convert", "export", "tokenize", "slurm")


def positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise LaunchError(option, f"must be at least 1, got {value}")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE and its overrides, as every command that reads a recipe takes them."""
    parser.add_argument("recipe", nargs="?", help="path to the recipe YAML")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="override recipe keys, e.g. optimizer.lr=3e-4"
    )
