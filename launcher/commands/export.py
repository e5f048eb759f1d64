"""`launcher export SOURCE OUT [--merged]`: a checkpoint as the directory a finished run exports.

SOURCE is a run directory (its newest complete checkpoint), a directory of checkpoints (likewise),
or one step_N directory, written under any layout (ddp, fsdp/hsdp, tensor parallel). The model is
built again from the recipe the checkpoint holds, its weights loaded (a LoRA run's checkpoint holds
the adapters only: they go over the base built again, as on resume), and for a transformers model
OUT is what the run writes as hf/ (save_pretrained, the data's tokenizer, the generation config);
with --merged, a LoRA run's adapters merged into the base, as hf-merged/. Any other model (the
built-in GPT) gets OUT/model.pt, the whole state dict a finished run leaves. Given the final step,
OUT equals the run's own export.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.errors import EXIT_OK, LaunchError

# what an export holds: an existing OUT with none of these is not one, and --overwrite leaves it alone
_EXPORT_FILES = ("config.json", "adapter_config.json", "model.pt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a save_pretrained directory (a transformers model) or model.pt",
        description="Export a run's newest checkpoint, or any step_N directory, as the run's own export: "
        "save_pretrained with the tokenizer and generation config for a transformers model (a LoRA run: the "
        "adapter, or with --merged the merged model), OUT/model.pt for any other model.",
    )
    p.add_argument("source", metavar="SOURCE", help="a run directory, a directory of step_N checkpoints, or a step_N")
    p.add_argument("out", metavar="OUT", help="the directory to write (it must not exist, unless --overwrite)")
    p.add_argument("--merged", action="store_true", help="a LoRA run: the adapters merged into the base")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier export")


def main(args: argparse.Namespace) -> int:
    import torch

    from launcher.checkpoint import checkpointer, frozen
    from launcher.checkpoint.reading import model_state
    from launcher.data.builders import build_model
    from launcher.errors import RecipeError
    from launcher.models import hf
    from launcher.observe.logs import route_library_bars, shows_bars
    from launcher.recipe import schema
    from launcher.storage import save_torch

    route_library_bars(shows_bars("auto"))  # the libraries' bars only on a terminal
    out = Path(args.out)
    _check_out(out, args.overwrite)
    step = _step_dir(args.source)
    try:
        payload = checkpointer.read(step)
        weights, saved_base = model_state(step, payload)
    except RecipeError as e:
        raise LaunchError("SOURCE", e.message) from None
    if not isinstance(payload.get("recipe"), dict):
        raise LaunchError("SOURCE", f"{step} holds no recipe (written by an older launcher): it cannot be rebuilt")
    recipe = schema.validate(payload["recipe"])
    with torch.device("cpu"):
        model = build_model(recipe)
    partial = saved_base is not None  # a LoRA run's: the trainable parameters only
    frozen.check_base(saved_base, frozen.fingerprint(model) if partial else None, str(step))
    expected = model.state_dict()
    if unknown := sorted(set(weights) - set(expected)):
        raise LaunchError("SOURCE", f"{step} holds weights the recipe's model has not: {', '.join(unknown[:3])}")
    missing = sorted(set(expected) - set(weights) - (frozen.frozen_names(model) if partial else set()))
    if missing:
        raise LaunchError("SOURCE", f"{step} lacks weights of the recipe's model: {', '.join(missing[:3])}")
    # a LoRA run's checkpoint: the adapters over the base built again from the recipe (as on resume)
    model.load_state_dict(weights, strict=not partial)
    whole = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not hf.is_pretrained(model):
        if args.merged:
            raise LaunchError("--merged", f"{step} is not a LoRA run's checkpoint: there are no adapters to merge")
        _atomically(out, lambda tmp: save_torch(whole, tmp / "model.pt"))
        print(f"{out}/model.pt: {len(whole)} tensors from {step} ({type(model).__name__} is no transformers model)")
        return EXIT_OK
    if args.merged and not hf.is_adapted(model):
        raise LaunchError("--merged", f"{step} is not a LoRA run's checkpoint: there are no adapters to merge")
    save_tokenizer = _tokenizer_saver(recipe)
    if args.merged:
        merged = hf.merged(model, whole)
        hf.export(merged, merged.state_dict(), out, save_tokenizer)  # written beside OUT, renamed over it
        what = "the merged model"
    else:
        hf.export(model, whole, out, save_tokenizer)
        what = "the adapter (--merged: the merged model)" if hf.is_adapted(model) else "the model"
    print(f"{out}: {what} of {step}, with save_pretrained (from_pretrained loads it)")
    return EXIT_OK


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise LaunchError("OUT", f"{out} is a symbolic link; name a directory")
    if out.exists():
        if not overwrite:
            raise LaunchError("OUT", f"{out} exists; pass --overwrite to replace it, or name another directory")
        if not out.is_dir() or not any((out / name).is_file() for name in _EXPORT_FILES):
            raise LaunchError(
                "OUT", f"{out} is not an earlier export (no {', '.join(_EXPORT_FILES)}): --overwrite leaves it alone"
            )
    if not out.parent.is_dir():
        raise LaunchError("OUT", f"{out.parent} is not a directory")


def _step_dir(source: str) -> Path:
    """SOURCE -> the checkpoint to export: a step_N directory, the newest of a directory of them, or
    the newest of a run directory's (its config.yaml's checkpoint.dir, else <run>/checkpoints)."""
    from launcher.checkpoint import step_dirs
    from launcher.errors import RecipeError

    path = Path(source).expanduser()
    if not path.exists():
        raise LaunchError("SOURCE", f"{path} does not exist; name a run directory or a step_N checkpoint directory")
    named = str(path)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / step_dirs.MARKER).exists():
        checkpoints = step_dirs.checkpoints_of_run(path)  # as checkpoint.resume and convert read a run directory
        if checkpoints is None:
            raise LaunchError("SOURCE", f"the run directory {path} has no checkpoints")
        named = str(checkpoints)
    try:
        step = step_dirs.resolve_resume(named, Path(named), warn=True)
    except RecipeError as e:
        raise LaunchError("SOURCE", e.message.replace("use one of those, auto, or none", "name one of those")) from None
    if step is None:
        raise LaunchError("SOURCE", f"{source!r} names no checkpoint; give a run directory or a step_N directory")
    return step


def _tokenizer_saver(recipe: Any) -> Callable[[Path], None] | None:
    """What writes the run's tokenizer beside its export, built as the run builds it: from data.train's
    tokenizer arguments (ChatData, TokenizedText: no data read), else from the dataset itself."""
    from launcher.datasets.chat import ChatData, ChatTokenizer
    from launcher.datasets.tokenized import TokenizedText, load_tokenizer
    from launcher.errors import ArgumentError, RecipeError
    from launcher.recipe.components import instantiate, resolve

    spec = dict(recipe.data.train)
    target = resolve(spec["_component_"], "data.train._component_")
    try:
        if target is ChatData and spec.get("tokenizer"):
            chat = ChatTokenizer.load(spec["tokenizer"], spec.get("tokenizer_revision"), spec.get("chat_template"))
            return chat.save_into
        if target is TokenizedText and spec.get("tokenizer"):
            return load_tokenizer(spec["tokenizer"], spec.get("tokenizer_revision")).save_into
    except ArgumentError as e:
        raise RecipeError(f"data.train.{e.argument}" if e.argument else "data.train", str(e)) from None
    dataset = instantiate(recipe.data.train, "data.train")
    return getattr(getattr(dataset, "tokenizer", None), "save_into", None)


def _atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Written into a temporary directory beside OUT, then renamed: a kill leaves no half of it."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
