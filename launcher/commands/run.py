"""`launcher run RECIPE [key=value ...] [--nproc N]`: train. Started plainly it is one process;
under torchrun or srun it is one rank of their job; with --nproc N it validates the recipe once
here, then starts N local workers (each `launcher run RECIPE`) under torch's elastic agent."""

from __future__ import annotations

import argparse
import os
import sys

from launcher.commands import add_recipe_arguments, positive
from launcher.errors import EXIT_FAILED, EXIT_OK, LaunchError
from launcher.recipe.schema import Recipe
from launcher.train.local import CHILD_ENV, elastic


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="train a recipe",
        description=(
            "Train RECIPE. Started plainly it runs one process; under torchrun it joins the job torchrun set up; "
            "with --nproc N it starts N local workers through torch's elastic launcher."
        ),
    )
    add_recipe_arguments(run)
    run.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local worker processes")
    run.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="with --nproc: restart the workers up to K times after a failure",
    )


def main(args: argparse.Namespace) -> int:
    from launcher.recipe import schema as recipes

    positive(args.nproc, "--nproc")
    if args.max_restarts < 0:
        raise LaunchError("--max-restarts", f"must be 0 or more, got {args.max_restarts}")
    recipe = recipes.load(args.recipe, args.overrides)
    if args.nproc is not None:
        return launch_local(recipe, args)
    from launcher.cluster import distributed
    from launcher.cluster.env import ClusterEnv
    from launcher.train import assemble

    env = ClusterEnv.detect()
    try:
        assemble.run(recipe, env)
    except Exception as e:
        if env.is_distributed and distributed.is_peer_failure(e):
            # the root cause is another rank's error, which it reports; no traceback, no error file here
            if not os.environ.get(CHILD_ENV):
                print(
                    f"[rank {env.rank}] stopped: another rank failed or left ({str(e).splitlines()[0][:200]})",
                    file=sys.stderr,
                    flush=True,
                )
            return EXIT_FAILED
        raise
    return EXIT_OK


def launch_local(recipe: Recipe, args: argparse.Namespace) -> int:
    """`launcher run --nproc N RECIPE`: validate once here, then N workers, each `launcher run RECIPE`."""
    from launcher.checkpoint.step_dirs import read_marker
    from launcher.commands.check import build_model_cheaply, check_static
    from launcher.data.plan import batch_shape
    from launcher.train.resume import (
        check_adapters,
        check_global_batch,
        check_shapes_match,
        checkpointed_state,
        shapes_of,
    )

    # fail here, once, before any worker starts, on everything that can be known without data
    dims = check_static(recipe, args.nproc)
    recipe.layout.preflight()
    recipe.layout.check_unlocked()  # another run in this directory: say so now (the main worker takes the lock)
    # validate only; the workers' main process acts on it
    resume_from = recipe.layout.prepare(recipe.checkpoint.resume, recipe.run.overwrite, act=False)
    if resume_from is not None:  # a resume that changes the global batch or the model: one line here, not per rank
        marker = read_marker(resume_from)
        check_global_batch(
            marker.get("global_batch"),
            batch_shape(recipe, dims.dp_size).global_batch,
            resume_from,
        )
        if "peft" in marker:  # markers written before it was kept have none
            check_adapters(marker["peft"], recipe.model.get("peft"), resume_from)
        if marker.get("shapes") is not None:  # built on the meta device: no memory, no weights
            model = checkpointed_state(build_model_cheaply(recipe))
            check_shapes_match(shapes_of(model), {k: tuple(v) for k, v in marker["shapes"].items()}, resume_from)
    return elastic(
        ["run", args.recipe, *args.overrides],
        args.nproc,
        args.max_restarts,
        preempt=recipe.checkpoint.preempt_signal,
        requeue_exit_code=recipe.checkpoint.requeue_exit_code,
        checkpoint_dir=recipe.checkpoint_dir,
        hang_dir=recipe.run_dir / "hang",
    )
