"""`launcher slurm`: render an sbatch script for a recipe (into its run directory), optionally submit it.

Templates (launcher/templates, also at slurm/ in the repository):
  single_node.sbatch  --mode torchrun --nodes 1: torchrun --standalone, one worker per GPU
  multi_node.sbatch   --mode torchrun --nodes N: srun starts one torchrun per node (c10d rendezvous)
  per_gpu.sbatch      --mode per-gpu: srun starts one task per GPU, each `launcher run` (SLURM detection)
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.commands import add_recipe_arguments, positive
from launcher.errors import EXIT_OK, LaunchError
from launcher.recipe.schema import Recipe

TEMPLATES = Path(__file__).parent.parent / "templates"


def template_name(mode: str, nodes: int) -> str:
    if mode == "per-gpu":
        return "per_gpu.sbatch"
    return "single_node.sbatch" if nodes == 1 else "multi_node.sbatch"


def render(
    recipe: Recipe,
    recipe_path: str,
    overrides: list[str],
    *,
    mode: str,
    nodes: int,
    gpus_per_node: int,
    nproc_per_node: int,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    cpus_per_task: int | None = None,
    grace_s: int = 120,
    python: str | None = None,
) -> str:
    run_dir = recipe.run_dir.resolve()
    resources = []
    if gpus_per_node:
        resources.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        resources.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    for option, value in (("time", time), ("partition", partition), ("account", account)):
        if value:
            resources.append(f"#SBATCH --{option}={value}")
    # the job runs in this run directory whatever directory it is submitted from
    args = [*overrides, f"run.dir={run_dir}"]
    fields = {
        "requeue_logic": (TEMPLATES / "requeue_logic.sh").read_text().rstrip(),
        "job_name": job_name or recipe.name,
        "nodes": str(nodes),
        "nproc_per_node": str(nproc_per_node),
        "sbatch_resources": "\n".join(resources) if resources else "# (no GPU, time, partition or account requested)",
        "run_dir": str(run_dir),
        "grace_s": str(grace_s),
        "python": python or sys.executable,
        "recipe": shlex.quote(str(Path(recipe_path).resolve())),
        "overrides": "".join(f" {shlex.quote(a)}" for a in args),
        "requeue_exit_code": str(recipe.checkpoint.requeue_exit_code),
        "preempt_signal": recipe.checkpoint.preempt_signal.upper().removeprefix("SIG"),
    }
    text = (TEMPLATES / template_name(mode, nodes)).read_text()
    for _ in range(2):  # the requeue logic has fields of its own
        for key, value in fields.items():
            text = text.replace("{{" + key + "}}", value)
    return text


def write_and_submit(text: str, path: Path, submit: bool) -> str | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    if not submit:
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "--submit", f"sbatch is not on PATH here; copy {path} to a SLURM login node and run `sbatch {path}`"
        )
    out = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}").splitlines()[-1]
        # sbatch prefixes its own errors ("sbatch: error: ..."): the key already says sbatch
        last = re.sub(r"^(sbatch:\s*)?(error:\s*)?", "", last)
        raise LaunchError("sbatch", last)
    return out.stdout.strip().split(";")[0]


def add_parser(sub: argparse._SubParsersAction) -> None:
    sl = sub.add_parser(
        "slurm",
        help="write an sbatch script for a recipe (and submit it)",
        description="Render the sbatch script for RECIPE into its run directory and print its path; "
        "with --submit, submit it with sbatch.",
    )
    add_recipe_arguments(sl)
    sl.add_argument(
        "--mode",
        choices=["torchrun", "per-gpu"],
        default="torchrun",
        help="torchrun: one torchrun per node starts the workers (default); per-gpu: one SLURM task per GPU",
    )
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs to request per node; 0 for CPU-only nodes")
    sl.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)")
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit, e.g. 24:00:00")
    sl.add_argument("--account")
    sl.add_argument("--job-name", help="default: the recipe's name")
    sl.add_argument("--cpus-per-task", type=int, default=None)
    sl.add_argument(
        "--grace-s", type=int, default=120, help="seconds between the preemption warning and the time limit"
    )
    sl.add_argument("--python", help="the Python with launcher installed, as the nodes see it (default: this one)")
    sl.add_argument("--submit", action="store_true", help="submit the script with sbatch")


def main(args: argparse.Namespace) -> int:
    from launcher.commands.check import check_static
    from launcher.recipe import schema as recipes

    nproc = args.nproc_per_node if args.nproc_per_node is not None else args.gpus_per_node
    positive(args.nodes, "--nodes")
    positive(nproc, "--nproc-per-node")
    if args.gpus_per_node < 0:
        raise LaunchError("--gpus-per-node", f"must be 0 or more, got {args.gpus_per_node}")
    if args.gpus_per_node and nproc > args.gpus_per_node:
        raise LaunchError(
            "--nproc-per-node", f"{nproc} ranks per node for {args.gpus_per_node} GPUs; use at most one rank per GPU"
        )
    recipe = recipes.load(args.recipe, args.overrides)
    check_static(recipe, args.nodes * nproc)
    text = render(
        recipe,
        args.recipe,
        args.overrides,
        mode=args.mode,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=nproc,
        partition=args.partition,
        time=args.time,
        account=args.account,
        job_name=args.job_name,
        cpus_per_task=args.cpus_per_task,
        grace_s=args.grace_s,
        python=args.python,
    )
    if args.submit:  # the job runs `python -m launcher` in this directory, as local workers do
        from launcher.train.local import check_workers_import_this_launcher

        check_workers_import_this_launcher(Path.cwd())
    path = recipe.run_dir / template_name(args.mode, args.nodes)
    job = write_and_submit(text, path, args.submit)
    print(path)
    if job:
        print(f"submitted job {job}; log: {recipe.run_dir.resolve()}/slurm-{job}.out")
    return EXIT_OK
