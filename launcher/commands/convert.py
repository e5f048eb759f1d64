"""`launcher convert CHECKPOINT [-o model.pt]`: one checkpoint's model weights as a single file.

A sharded (fsdp/hsdp) checkpoint's shards are read and joined in this one process; a ddp one's
weights are copied out. Either way the file is what a finished run leaves as model.pt: the
model's full state dict, on the CPU, which `torch.load(path, weights_only=True)` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.errors import EXIT_OK, LaunchError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint's model weights (sharded or not) as one model.pt",
        description="Join a checkpoint's model weights into one file that torch.load(weights_only=True) reads.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a step_N directory, or a directory of them (its newest)")
    p.add_argument("-o", "--output", default="model.pt", help="the file to write (default: ./model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def main(args: argparse.Namespace) -> int:
    from launcher.checkpoint import step_dirs
    from launcher.checkpoint.reading import model_weights
    from launcher.errors import RecipeError
    from launcher.storage import save_torch

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LaunchError("--output", f"{out} exists; pass --overwrite to replace it, or name another file")
    if not out.parent.is_dir():
        raise LaunchError("--output", f"{out.parent} is not a directory")
    try:
        path = step_dirs.resolve_resume(args.checkpoint, Path(args.checkpoint), warn=True)
    except RecipeError as e:
        raise LaunchError("CHECKPOINT", e.message) from None
    if path is None:  # auto or none: no directory named
        raise LaunchError(
            "CHECKPOINT", f"{args.checkpoint!r} names no checkpoint; give a step_N directory or a directory of them"
        )
    try:
        weights, partial = model_weights(path)
    except RecipeError as e:
        raise LaunchError("CHECKPOINT", e.message) from None
    save_torch(weights, out)
    print(f"{out}: {len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} parameters from {path}")
    if partial:  # a LoRA run's: the base was built again on resume, never saved
        print(
            "note: the checkpoint holds the trainable parameters only (its frozen base is not checkpointed): "
            "load them over the base with load_state_dict(strict=False); the run's model.pt and hf-merged/ hold "
            "the whole model, and `launcher export CHECKPOINT OUT --merged` writes it from this checkpoint"
        )
    return EXIT_OK
