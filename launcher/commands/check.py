"""`launcher check`: everything that can be validated without a process group or a GPU."""

from __future__ import annotations

import argparse
import os

import torch

from launcher import components, data_fit, memory, parallel, sharding
from launcher.batches import Counting
from launcher.builders import build_collate, build_datasets, checked_model, train_samples
from launcher.commands import add_recipe_arguments, positive
from launcher.cpu import step_time_estimate
from launcher.errors import EXIT_OK, BuildError, LaunchError
from launcher.memory import state_checkpoint_bytes
from launcher.plan import batch_shape, build_plan, check_ranks, plan_warnings
from launcher.recipe import COMPONENT_KEYS, Recipe, get_key


def check_static(recipe: Recipe, world_size: int) -> None:
    """Checks that need neither data nor a model: component signatures, the batch arithmetic, ranks."""
    for key, n_runtime in COMPONENT_KEYS.items():
        spec = get_key(recipe, key)
        if spec is not None:
            components.check(spec, key, n_runtime)
    batch_shape(recipe, world_size)
    check_ranks(recipe, world_size)
    sharding.check(recipe, world_size)


def build_model_cheaply(recipe: Recipe) -> torch.nn.Module:
    """The model on the meta device (no memory, no GPU); on CPU if it cannot be built there."""
    try:
        with torch.device("meta"):
            model = components.instantiate(recipe.model, "model")
    except BuildError:
        model = components.instantiate(recipe.model, "model")
    return checked_model(model, recipe)


def check_recipe(recipe: Recipe, world_size: int) -> str:
    from launcher.distributed import pick_backend

    check_static(recipe, world_size)
    notes = []
    for error, certain in recipe.layout.problems():
        if certain:
            raise error
        notes.append(f"{error.key}: {error.message}")  # this machine may not be the one that runs it
    model = build_model_cheaply(recipe)
    ac = recipe.train.activation_checkpointing
    parallel.check_segments(model, ac.segments if isinstance(ac.segments, int) else 0, ac.head_chunks)
    if ac.modules:
        parallel.checkpointed_modules(model, ac.modules)
    if recipe.dist.strategy != "ddp":
        sharding.units(model, recipe.dist.fsdp.units)  # as the run does: a class the model lacks, tied units
    n_params = sum(p.numel() for p in model.parameters())
    space = recipe.layout.space_warning(state_checkpoint_bytes(model))
    if space:
        notes.append(f"checkpoint.dir: {space}")
    try:
        backend, torch_device = pick_backend(recipe.dist.backend, 0, world_size)
        backend, device = (backend if world_size > 1 else "none (world size 1)"), str(torch_device)
    except LaunchError as e:
        backend, device = recipe.dist.backend, "unavailable here"
        notes.append(f"{e.key}: {e.message}")
    try:
        train_set, val_set = build_datasets(recipe)
        data_fit.check(model, {"data.train": train_set, "data.val": val_set}, build_collate(recipe))
        plan = build_plan(
            recipe,
            world_size,
            train_samples(recipe, train_set, world_size),
            len(val_set) if val_set is not None else None,
            backend,
            device,
        )
        rows = plan.describe()
        notes += plan_warnings(recipe, plan, device.split(":")[0])
        flops = getattr(model, "flops_per_sample", None)
        if device == "cpu" and isinstance(flops, (int, float)) and flops > 0:
            rows.append(("step time (estimate)", step_time_estimate(flops, plan.global_batch, recipe.train.precision)))
    except BuildError as e:
        # data that lives only on the cluster is not a recipe error; anything else is
        if not (e.key.startswith("data.") and isinstance(e.cause, FileNotFoundError)):
            raise
        shape = batch_shape(recipe, world_size)
        rows = [
            ("world size", str(world_size)),
            ("backend / device", f"{backend} / {device}"),
            ("micro-batch per rank", str(shape.micro_batch)),
            ("accumulation steps", str(shape.accumulation)),
            ("global batch", str(shape.global_batch)),
            ("steps per epoch", "unknown: data not available here"),
        ]
        notes.append(f"{e.key}: {e.message}")
    counting = Counting.of(recipe.train.loss_mean_over, model, model_computes_loss=recipe.loss is None)
    rows.append(("loss: the mean over", counting.describe()))
    rows.append(("parameters", f"{n_params:,}"))
    memory_rows, memory_note = _memory_plan(recipe, model, world_size, device)
    rows += memory_rows
    notes += memory_note
    width = max(len(k) for k, _ in rows)
    out = ["# resolved recipe", recipe.to_yaml().rstrip(), "", "# plan"]
    out += [f"{k:<{width}}  {v}" for k, v in rows]
    out += [f"warning: {n}" for n in notes]
    return "\n".join(out)


def _memory_plan(
    recipe: Recipe, model: torch.nn.Module, world_size: int, device: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Bytes per rank kept between steps under ddp and under fsdp (hsdp: over its shard group), and
    a warning when ddp's would not fit this device (activations come on top)."""
    moments = memory.optimizer_moments(recipe.optimizer)
    group = world_size
    if recipe.dist.strategy == "hsdp":
        group = sharding.shard_group_size(recipe.dist.fsdp, world_size, None)
    plans = {
        "ddp": memory.state_plan(model, moments, 1),
        f"fsdp over {group}": memory.state_plan(model, moments, group),
    }
    rows = [
        (
            f"per rank, {name}",
            f"{_size(p.total)} (parameters {_size(p.params)} + gradients {_size(p.grads)} "
            f"+ optimizer state {_size(p.optimizer)})",
        )
        for name, p in plans.items()
    ]
    capacity = _device_bytes(device, world_size)
    notes = []
    if capacity is not None and plans["ddp"].total > capacity:
        notes.append(
            f"dist.strategy: under ddp each rank keeps {_size(plans['ddp'].total)} of weights, gradients and "
            f"optimizer state, more than this {device.split(':')[0]} has per rank ({_size(capacity)}); use "
            "dist.strategy=fsdp (see per rank, fsdp above)"
        )
    return rows, notes


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _device_bytes(device: str, world_size: int) -> int | None:
    """A GPU's memory, or on the CPU the host's memory shared by the ranks of one machine."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(world_size, 1)
    return None


def add_parser(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "check",
        help="validate a recipe and print the resolved config and plan",
        description="Validate RECIPE and print the resolved config and the plan. "
        "Creates no process group and touches no GPU, but imports the recipe's "
        "components and builds its model (on the meta device) and datasets: "
        "a recipe is code; check only recipes you trust.",
    )
    add_recipe_arguments(check)
    check.add_argument(
        "--nproc", type=int, default=None, metavar="N", help="plan for N ranks (default: WORLD_SIZE if set, else 1)"
    )


def main(args: argparse.Namespace) -> int:
    from launcher import recipe as recipes

    positive(args.nproc, "--nproc")
    recipe = recipes.load(args.recipe, args.overrides)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1") or 1)
    print(check_recipe(recipe, world))
    return EXIT_OK
