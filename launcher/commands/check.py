"""`launcher check`: everything that can be validated without a process group or a GPU."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher import hub
from launcher.cluster.cpu import step_time_estimate, threads_per_rank
from launcher.commands import add_recipe_arguments, positive
from launcher.data import fit, loss_mean, streaming
from launcher.data.batches import Counting
from launcher.data.builders import _first_sample, build_collate, build_datasets, build_model, train_samples
from launcher.data.plan import batch_shape, build_plan, check_ranks, plan_warnings
from launcher.errors import EXIT_OK, EXIT_USAGE, BuildError, LaunchError, RecipeError
from launcher.models.flops import flops_per_sample
from launcher.observe.logs import route_library_bars, shows_bars
from launcher.parallel import context_plan, memory, pipeline, pipelined, sharding, sizes, tensor, wrap
from launcher.parallel.choose import build_strategy
from launcher.parallel.dims import ParallelDims, dims_for
from launcher.parallel.memory import state_checkpoint_bytes
from launcher.recipe import components
from launcher.recipe.schema import COMPONENT_KEYS, Recipe, component_spec
from launcher.train import setup


def check_static(recipe: Recipe, world_size: int) -> ParallelDims:
    """Checks that need neither data nor a model: component signatures, the batch arithmetic, ranks.
    Returns the recipe's parallel dimensions over `world_size` ranks."""
    for key, n_runtime in COMPONENT_KEYS.items():
        spec = component_spec(recipe, key)
        if spec is not None:
            components.check(spec, key, n_runtime)
    sharding.check(recipe)
    pipelined.check(recipe)
    context_plan.check(recipe)
    dims = dims_for(recipe, world_size)  # dimensions that do not multiply to the world size are refused
    shape = batch_shape(recipe, dims.dp_size)
    if dims.enabled("pp"):  # a window's micro-batches must fill the schedule
        cfg = recipe.dist.pipeline
        pipeline.check_micro_batches(cfg.schedule, dims.pp, cfg.stages_per_rank, shape.accumulation)
    check_ranks(recipe, world_size)
    return dims


def build_model_cheaply(recipe: Recipe) -> torch.nn.Module:
    """The model (with its adapters) on the meta device (no memory, no GPU); on CPU if it cannot be built there."""
    try:
        with torch.device("meta"):
            model = build_model(recipe)
    except BuildError:
        model = None
    if model is None:  # outside the except: a failure here is not reported as caused by the meta device
        model = build_model(recipe)
    return model


def _check_resume(recipe: Recipe, notes: list[str]) -> None:
    """checkpoint.resume naming a path: what is there must be a checkpoint (or a directory of them).
    A path missing here may exist where the run runs: a note, not an error."""
    from launcher.checkpoint import step_dirs

    resume = recipe.checkpoint.resume
    if resume in ("auto", "none"):
        return
    try:
        step_dirs.resolve_resume(resume, recipe.checkpoint_dir, warn=False, check=quick_verify)
    except RecipeError as e:
        if Path(resume).expanduser().exists():
            raise
        notes.append(f"{e.key}: {e.message}")


def quick_verify(path: Path) -> str | None:
    """A checkpoint's marker and sizes, without hashing its files (the run hashes them)."""
    from launcher.checkpoint import step_dirs

    return step_dirs.verify(path, hashes=False)


@dataclass(frozen=True)
class Report:
    text: str  # the resolved recipe, the plan, warnings and a summary line
    fits: bool  # each rank fits the GPU memory asked for (True when not asked)
    unread: list[str]  # data that could not be read here (`key: why`): the plan is partial


def check_recipe(recipe: Recipe, world_size: int, gpu_memory_gib: float | None = None) -> Report:
    from launcher.cluster.distributed import pick_backend

    dims = check_static(recipe, world_size)
    route_library_bars(shows_bars(recipe.log.progress))
    notes = []
    for error, certain in recipe.layout.problems():
        if certain:
            raise error
        notes.append(f"{error.key}: {error.message}")  # this machine may not be the one that runs it
    _check_resume(recipe, notes)
    loss_fn = setup.loss(recipe)  # as the run builds it: not callable, or not a mean, is one line here
    model = build_model_cheaply(recipe)
    sizes.check(model, recipe.model)  # built on the meta device: the run would fail at the allocator
    ac = recipe.train.activation_checkpointing
    wrap.check_segments(model, ac.segments if isinstance(ac.segments, int) else 0, ac.head_chunks)
    if ac.modules:
        wrap.checkpointed_modules(model, ac.modules)
    # as the run does: a class the model lacks, tied units (the strategy as if a process group ran it)
    strategy = build_strategy(recipe, dims, torch.device("cpu"), has_process_group=True)
    strategy.prepare(model)
    space = recipe.layout.space_warning(state_checkpoint_bytes(model))
    if space:
        notes.append(f"checkpoint.dir: {space}")
    pieces = dims.dp_shard * dims.tp
    notes += _async_save_notes(recipe, memory.checkpointed_state_bytes(model), pieces)
    try:
        backend, torch_device = pick_backend(recipe.dist.backend, 0, world_size)
        backend, device = (backend if world_size > 1 else "none (world size 1)"), str(torch_device)
    except LaunchError as e:
        backend, device = recipe.dist.backend, "unavailable here"
        notes.append(f"{e.key}: {e.message}")
    sample = None  # the first training sample, for the activations' measure (--gpu-memory)
    unread: list[str] = []
    try:
        train_set, val_set = build_datasets(recipe)
        sample = _first_sample(train_set)
        context_plan.check_sample(sample, model, dims.cp)
        fit.check(model, {"data.train": train_set, "data.val": val_set}, build_collate(recipe))
        if recipe.loss and getattr(loss_fn, "reduction", None) is None and not streaming.is_stream(train_set):
            # a loss of one's own says nothing of how it reduces: a sample once and twice over tells
            loss_mean.probe(loss_fn, model, train_set, build_collate(recipe), recipe.loss["_component_"])
        plan = build_plan(
            recipe,
            dims,
            train_samples(recipe, train_set, dims.dp_size),
            len(val_set) if val_set is not None else None,
            backend,
            device,
            streamed=streaming.is_stream(train_set),
        )
        rows = plan.describe()
        notes += plan_warnings(recipe, plan, device.split(":")[0]) + fit.notes(
            {"data.train": train_set, "data.val": val_set}
        )
        flops = flops_per_sample(model, train_set)
        if device == "cpu" and flops is not None:
            # as the run will: its ranks on this machine, each on its share of the cores
            threads = threads_per_rank(world_size)[0]
            estimate = step_time_estimate(flops, plan.global_batch, world_size, threads, recipe.train.precision)
            rows.append(("step time (estimate)", estimate.describe()))
    except BuildError as e:
        # data that lives only on the cluster is not a recipe error; anything else is
        if not (e.key.startswith("data.") and isinstance(e.cause, FileNotFoundError)):
            raise
        unread.append(f"{e.key}: {e.message}")
        shape = batch_shape(recipe, dims.dp_size)
        rows = [
            ("world size", str(world_size)),
            ("backend / device", f"{backend} / {device}"),
            ("micro-batch per rank", str(shape.micro_batch)),
            ("accumulation steps", str(shape.accumulation)),
            ("global batch", str(shape.global_batch)),
            ("steps per epoch", "unknown: data not available here"),
        ]
    counting = Counting.of(recipe.train.loss_mean_over, model, model_computes_loss=recipe.loss is None)
    rows.append(("loss: the mean over", counting.describe()))
    rows.append(("parameters", memory.describe_parameters(model)))
    rows += [("from the hub", source.describe()) for source in hub.resolved.values()]
    rows += context_plan.plan_rows(model, dims, batch_shape(recipe, dims.dp_size).micro_batch, sample, recipe)
    if dims.enabled("pp"):  # each stage's state per rank, in place of the whole model's
        rows += pipelined.plan_rows(recipe, model, dims, batch_shape(recipe, dims.dp_size).accumulation)
    else:
        memory_rows, memory_note = _memory_plan(recipe, model, dims, device)
        rows += memory_rows
        notes += memory_note
    fits = True
    if gpu_memory_gib is not None:
        from launcher.commands.gpu_fit import gpu_fit

        fits, line = gpu_fit(recipe, model, dims, sample, gpu_memory_gib)
        rows.append((f"fits {gpu_memory_gib:g} GiB", line))
    width = max(len(k) for k, _ in rows)
    out = ["# resolved recipe", recipe.to_yaml().rstrip(), "", "# plan"]
    out += [f"{k:<{width}}  {v}" for k, v in rows]
    out += [f"warning: {n}" for n in notes]
    out.append(_summary(notes, unread))
    return Report("\n".join(out), fits, unread)


def _summary(notes: list[str], unread: list[str]) -> str:
    """The last line: what check could not check, first (a long plan buries a warning)."""
    warned = f"; {len(notes)} warning{'s' if len(notes) != 1 else ''} above" if notes else ""
    if unread:
        return (
            f"check: NOT all checked: {'; '.join(unread)} (the data is read where the run runs; the plan above is "
            f"partial{warned}; --strict makes this exit 2)"
        )
    return f"check: ok{warned}"


def _memory_plan(
    recipe: Recipe, model: torch.nn.Module, dims: ParallelDims, device: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Bytes per rank kept between steps under ddp and under fsdp (hsdp: over its shard group), and
    a warning when ddp's would not fit this device (activations come on top)."""
    moments = memory.optimizer_moments(recipe.optimizer)
    # the ranks fsdp (or hsdp's group) shards over: with the context ranks folded in (dims.data_mesh)
    group = (dims.dp_shard if dims.hybrid else dims.dp_size) * dims.cp
    plans = {"ddp": memory.state_plan(model, moments, 1)}
    if group > 1:  # over one rank fsdp keeps what ddp does: no row of its own
        plans[f"fsdp over {group}"] = memory.state_plan(model, moments, group)
    splits: list[tuple[str, str]] = []
    if dims.tp > 1:  # the chosen layout: the plan's layers split, then sharded (or replicated) over dp
        plan = tensor.plan_of(model, recipe.dist.tp_plan)
        split = tensor.split_params(model, plan)
        dp = f"{dims.dp_replicate} x {dims.dp_shard}" if dims.hybrid else str(dims.dp_size)
        chosen = f"{recipe.dist.strategy} {dp} x tp {dims.tp}"  # short: the mesh row has the whole layout
        plans = {chosen: memory.state_plan(model, moments, dims.dp_shard * dims.cp, dims.tp, split)} | plans
        splits = [("tensor parallel", tensor.describe_split(model, plan, dims.tp))]
    rows = splits + [
        (
            f"per rank, {name}",
            f"{_size(p.total)} (parameters {_size(p.params)} + gradients {_size(p.grads)} "
            f"+ optimizer state {_size(p.optimizer)})",
        )
        for name, p in plans.items()
    ]
    capacity = _device_bytes(device, dims.world_size)
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
    check.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="say whether each rank fits a GPU of GIB GiB under this layout, and if not which change would "
        "(exit 2 when it does not fit)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 when data files cannot be read here (for CI), instead of a partial plan and a summary",
    )


def main(args: argparse.Namespace) -> int:
    from launcher.recipe import schema as recipes

    positive(args.nproc, "--nproc")
    recipe = recipes.load(args.recipe, args.overrides)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise LaunchError("--gpu-memory", f"a GPU's memory in GiB, above 0; got {args.gpu_memory:g}")
    report = check_recipe(recipe, world, args.gpu_memory)
    print(report.text, flush=True)
    if args.strict and report.unread:
        key, _, why = report.unread[0].partition(": ")
        raise LaunchError(key, f"{why} (--strict: data that cannot be read here fails the check)")
    return EXIT_OK if report.fits else EXIT_USAGE


def _async_save_notes(recipe: Recipe, state_bytes: int, pieces: int) -> list[str]:
    """What checkpoint.async_save costs and does, for this recipe. `state_bytes`: the weights and
    optimizer state, split over `pieces` ranks (shards and tensor-parallel parts)."""
    if not recipe.checkpoint.async_save:
        return []
    if recipe.checkpoint.every_n_steps is None:
        return [
            "checkpoint.async_save: no effect without checkpoint.every_n_steps "
            "(the final and preemption saves are synchronous)"
        ]
    per_rank = state_bytes / pieces / 2**20
    return [f"checkpoint.async_save: each save holds a host copy of the state, about {per_rank:,.1f} MiB per rank"]
