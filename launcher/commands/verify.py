"""`launcher verify RECIPE --layouts 1 ddp:2 fsdp:2 tp:2 [--steps N] [key=value ...]`: does this recipe
keep the launcher's promise, that the maths does not depend on the layout?

It trains the recipe for a few steps at each layout, on this machine (CPU and gloo), each in a
temporary run directory of its own, with one global batch for all; then compares the logged loss and
gradient norm of every step, and every weight after every step, with the first layout's, and prints a
table and a verdict: exit 0 when every layout equals the first within --rtol, 1 otherwise, naming the
first step and tensor that differ, and the causes it can see in the recipe and the model (dropout,
BatchNorm, non-determinism, Adam on a parameter whose gradient is exactly 0). What `launcher check`
refuses, a loss that is not a mean among it, is refused first, in one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from launcher.commands import add_recipe_arguments, positive
from launcher.errors import EXIT_FAILED, EXIT_OK, LaunchError

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

DEFAULT_LAYOUTS = ("1", "ddp:2", "fsdp:2", "tp:2")
DIMENSIONS = {"ddp": "dist.strategy=ddp", "fsdp": "dist.strategy=fsdp", "hsdp": "dist.strategy=hsdp"}
# dimensions whose ranks read the same batch: each layout sets every one (1 where it does not name it)
MODEL_DIMENSIONS = {"tp": "dist.tensor_parallel", "cp": "dist.context_parallel", "pp": "dist.pipeline_parallel"}
KINDS = "ddp:N, fsdp:N, hsdp:N, tp:N, cp:N or pp:N"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="train a recipe for a few steps at several layouts and check that they agree",
        description=(
            "Train RECIPE for --steps steps at each layout on this machine (CPU, gloo) and compare losses, "
            "gradient norms and weights with the first layout's, step by step. Exit 0 when all agree "
            "within --rtol, 1 otherwise, naming the first difference and the causes it can see."
        ),
    )
    add_recipe_arguments(p)
    p.add_argument(
        "--layouts",
        nargs="+",
        default=list(DEFAULT_LAYOUTS),
        metavar="LAYOUT",
        help="1 (one process), ddp:N, fsdp:N, hsdp:N, tp:N, cp:N, pp:N, or dimensions joined by commas (fsdp:2,tp:2); "
        f"the first is the reference (default: {' '.join(DEFAULT_LAYOUTS)})",
    )
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per layout (default: 3)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance per tensor (default: 1e-5)")


@dataclass(frozen=True)
class Layout:
    """One layout to train at: its name as given, its worker count and its overrides."""

    name: str
    nproc: int
    overrides: tuple[str, ...]
    dp: int  # data-parallel ranks (the global batch must split over them)


def parse_layout(text: str) -> Layout:
    nproc, dp, overrides = 1, 1, []
    sizes = dict.fromkeys(MODEL_DIMENSIONS, 1)
    for part in [] if text == "1" else text.split(","):
        kind, _, size = part.partition(":")
        if kind not in {**DIMENSIONS, **MODEL_DIMENSIONS} or not size.isdigit() or int(size) < 1:
            raise LaunchError(
                "--layouts",
                f"{text!r}: each part is {KINDS} (N ranks), joined by commas; or 1 for one process",
            )
        n = int(size)
        nproc *= n
        if kind in MODEL_DIMENSIONS:
            sizes[kind] = n
        else:
            dp *= n
            overrides.append(DIMENSIONS[kind])
    overrides += [f"{MODEL_DIMENSIONS[kind]}={n}" for kind, n in sizes.items()]
    return Layout(text, nproc, tuple(overrides), dp)


def main(args: argparse.Namespace) -> int:
    from launcher.commands.check import check_recipe
    from launcher.recipe import schema as recipes

    positive(args.steps, "--steps")
    if not args.rtol > 0:
        raise LaunchError("--rtol", f"must be above 0, got {args.rtol}")
    layouts = [parse_layout(t) for t in args.layouts]
    if len(layouts) < 2:
        raise LaunchError("--layouts", "name two layouts or more: the first is compared with the others")
    recipe = recipes.load(args.recipe, args.overrides)
    # what launcher check refuses (a loss that sums among it) is one line here, not once per layout
    if unread := check_recipe(recipe, max(lay.nproc for lay in layouts)).unread:
        key, _, why = unread[0].partition(": ")
        raise LaunchError(key, f"{why} (verify trains here: the data must be here)")
    causes = static_causes(recipe, layouts)
    for cause in causes:
        print(f"warning: {cause}", file=sys.stderr, flush=True)
    common = list(args.overrides) + common_overrides(recipe, layouts, args.steps)
    with tempfile.TemporaryDirectory(prefix="launcher-verify-") as tmp:
        runs = {lay.name: train(args.recipe, common, lay, Path(tmp)) for lay in layouts}
        reference = layouts[0].name
        rows, first = [], None
        for lay in layouts[1:]:
            diff = compare(runs[reference], runs[lay.name], args.rtol)
            rows.append((lay.name, diff))
            first = first or diff.first
        print_table(reference, rows, args.rtol)
        if first is None:
            print(f"verify: every layout equals {reference} within rtol {args.rtol:g} over {args.steps} steps")
            return EXIT_OK
        # a difference: does the reference reproduce itself? (if not, nothing here is deterministic)
        again = train(args.recipe, common, layouts[0], Path(tmp), suffix="-again")
        if compare(runs[reference], again, args.rtol).first is not None:
            causes.append(
                f"the {reference} run does not reproduce itself: a non-deterministic operation or data "
                "(seed every random draw from the recipe; torch.use_deterministic_algorithms shows which op)"
            )
        causes += dynamic_causes(recipe, runs[reference], runs, first)
    why = "; ".join(causes) if causes else "no known cause found in the recipe or the model"
    print(f"verify: {first.describe()}; {why}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def common_overrides(recipe: Recipe, layouts: list[Layout], steps: int) -> list[str]:
    """What every layout's run shares: few steps, a row and a checkpoint every step, gloo, one global
    batch that every layout's data-parallel ranks split (the recipe's, else batch_size x their lcm)."""
    out = [
        f"train.max_steps={steps}",
        "log.every_n_steps=1",
        "log.wandb=null",
        "log.tensorboard=false",
        "log.progress=lines",
        "log.profile=null",
        "checkpoint.every_n_steps=1",
        f"checkpoint.keep_last={steps + 1}",
        "checkpoint.async_save=false",
        "checkpoint.dir=null",
        "checkpoint.resume=none",
        "dist.backend=gloo",
        "train.eval_every_steps=null",
    ]
    if recipe.train.global_batch_size is None:
        out.append(f"train.global_batch_size={recipe.data.batch_size * math.lcm(*(lay.dp for lay in layouts))}")
    return out


@dataclass
class Run:
    layout: str
    metrics: list[dict[str, float]]  # the training rows, by step
    weights: dict[int, dict[str, torch.Tensor]]  # after each step


def train(recipe_path: str, common: list[str], lay: Layout, tmp: Path, suffix: str = "") -> Run:
    from launcher.observe.metrics import read_metrics

    run_dir = tmp / (lay.name.replace(":", "").replace(",", "-") + suffix)
    cmd = [sys.executable, "-m", "launcher", "run", recipe_path, *common, *lay.overrides, f"run.dir={run_dir}"]
    if lay.nproc > 1:
        cmd[4:4] = ["--nproc", str(lay.nproc)]
    print(f"verify: training at {lay.name}{suffix} ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError("--layouts", f"{lay.name}: the run failed (exit {proc.returncode}): {last}")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl")[0] if "loss" in r and "samples" in r]
    return Run(lay.name, rows, step_weights(run_dir / "checkpoints"))


def step_weights(directory: Path) -> dict[int, dict[str, torch.Tensor]]:
    from launcher.checkpoint import step_dirs
    from launcher.checkpoint.reading import model_weights

    return {int(p.name.partition("_")[2]): model_weights(p)[0] for p in step_dirs.list_checkpoints(directory)}


@dataclass(frozen=True)
class Difference:
    layout: str
    step: int
    what: str  # "loss", "grad_norm" or a tensor's name
    rel: float

    def describe(self) -> str:
        return (
            f"{self.layout} differs from the reference first at step {self.step}, in {self.what} "
            f"(relative {self.rel:.3g})"
        )


@dataclass(frozen=True)
class Comparison:
    loss: float
    grad_norm: float
    weights: float
    first: Difference | None


def compare(ref: Run, other: Run, rtol: float) -> Comparison:
    """The largest relative difference of each kind over every step, and the first step at which one
    exceeds `rtol` (naming the tensor that differs most there, else the logged value)."""
    worst = {"loss": 0.0, "grad_norm": 0.0, "weights": 0.0}
    first: Difference | None = None
    by_step = {int(r["step"]): r for r in other.metrics}
    for row in ref.metrics:
        step = int(row["step"])
        theirs = by_step.get(step)
        if theirs is None:
            return Comparison(
                math.inf, math.inf, math.inf, first or Difference(other.layout, step, "its row", math.inf)
            )
        over: list[tuple[float, str]] = []  # (relative difference, what) past rtol at this step
        for key in ("loss", "grad_norm"):
            if key in row:
                rel = _rel(float(theirs.get(key, math.nan)), float(row[key]))
                worst[key] = max(worst[key], rel)
                over += [(rel, key)] if rel > rtol else []
        tensors: list[tuple[float, str]] = []
        mine, yours = ref.weights.get(step, {}), other.weights.get(step, {})
        for name in mine:
            rel = _tensor_rel(yours.get(name), mine[name])
            worst["weights"] = max(worst["weights"], rel)
            tensors += [(rel, name)] if rel > rtol else []
        if first is None and (tensors or over):
            rel, what = max(tensors) if tensors else max(over)
            first = Difference(other.layout, step, what, rel)
    return Comparison(worst["loss"], worst["grad_norm"], worst["weights"], first)


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def _tensor_rel(a: torch.Tensor | None, b: torch.Tensor) -> float:
    if a is None or a.shape != b.shape:
        return math.inf
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def print_table(reference: str, rows: list[tuple[str, Comparison]], rtol: float) -> None:
    header = ("layout", "loss", "grad norm", "weights", f"within {rtol:g}")
    lines = [header, (reference, "reference", "", "", "")]
    for name, c in rows:
        lines.append(
            (name, f"{c.loss:.2g}", f"{c.grad_norm:.2g}", f"{c.weights:.2g}", "yes" if c.first is None else "NO")
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("largest relative difference from the reference, over every step:")
    for line in lines:
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def static_causes(recipe: Recipe, layouts: list[Layout]) -> list[str]:
    """What in the recipe and its model makes the layouts differ, seen before training."""
    from launcher.commands.check import build_model_cheaply

    model = build_model_cheaply(recipe)
    found = []
    dropout = sorted(
        {
            f"{name or 'model'} (p={m.p:g})"
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
        }
    )
    config = getattr(model, "config", None)
    for key, value in vars(config).items() if config is not None else []:
        if "dropout" in key and isinstance(value, float) and value > 0:
            dropout.append(f"config.{key}={value:g}")
    if dropout:
        found.append(
            f"dropout is on ({', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''}): each rank draws its own "
            "masks, so layouts differ; set it to 0 to verify (model.dropout=0 or the config's)"
        )
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms and any(lay.dp > 1 for lay in layouts):
        found.append(
            f"BatchNorm ({norms[0]}{', ...' if len(norms) > 1 else ''}) normalises over each rank's micro-batch, "
            "not the global batch: layouts differ (torch.nn.SyncBatchNorm.convert_sync_batchnorm syncs them)"
        )
    return found  # a loss that is not a mean: launcher check refuses it (launcher/data/loss_mean.py)


def dynamic_causes(recipe: Recipe, ref: Run, runs: dict[str, Run], first: Difference) -> list[str]:
    """After training: Adam on a parameter whose gradient was exactly 0 in the reference (it did not
    move at some step), but moved elsewhere, where float noise made its gradient tiny and not 0:
    Adam's update divides by the gradient's own size, so that noise becomes a full step."""
    optimizer = str(recipe.optimizer.get("_component_", ""))
    if "adam" not in optimizer.lower() or first.what in ("loss", "grad_norm", "a missing row"):
        return []
    other = runs[first.layout]
    before = ref.weights.get(first.step - 1)
    if before is None or first.what not in before:
        return []
    still = torch.equal(ref.weights[first.step][first.what], before[first.what])
    moved = not torch.equal(
        other.weights[first.step][first.what], other.weights.get(first.step - 1, before)[first.what]
    )
    if still and moved:
        return [
            f"{optimizer} on {first.what}, whose gradient was exactly 0 at step {first.step} in the reference: "
            "another layout's float noise makes it tiny, not 0, and Adam turns that into a full step (use SGD to "
            "verify, or leave such parameters out of training)"
        ]
    return []
