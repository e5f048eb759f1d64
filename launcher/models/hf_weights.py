"""Whether a pretrained directory's weights fit the model its config.json describes.

transformers builds the model from config.json and loads what matches: a config.json of another
architecture (a GPT-2 directory saying `model_type: bert`) loads nothing and trains from random
weights, and one of other sizes prints a long table. Both are one line here: at the run, from
transformers' own report of what it loaded (`output_loading_info`); at `launcher check`, from the
safetensors headers (names and shapes, no tensor read) against the model built on the meta device,
where they plainly disagree: no weight in common, or a weight of another shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHOWN = 3  # keys named per kind of disagreement


def load_error(directory: Path, model: nn.Module, info: dict[str, Any]) -> str | None:
    """What transformers' loading info (`from_pretrained(..., output_loading_info=True,
    ignore_mismatched_sizes=True)`) says did not load, as one line; None if every weight did. Keys it
    expects to miss (a head tied to the embedding, its ignore lists, buffers not saved) are not in it."""
    mismatched = sorted((key, tuple(saved), tuple(built)) for key, saved, built in info.get("mismatched_keys") or ())
    return _describe(directory, model, info.get("missing_keys") or (), info.get("unexpected_keys") or (), mismatched)


def header_error(directory: Path, model: nn.Module) -> str | None:
    """The same judgement before any weight is read (`launcher check`), from the safetensors headers,
    where it is certain: none of the files' weights is one of the model's (another architecture), or
    one of them has another shape (another size). What only some keys miss is left to the run, which
    knows transformers' renames and ignore lists."""
    from safetensors import safe_open

    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None:  # quantized weights have shapes of their own
        return None
    saved: dict[str, tuple[int, ...]] = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                saved[key] = tuple(f.get_slice(key).get_shape())
    if not saved:
        return None
    built = _own_state(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {key: name for key in saved if (name := _model_key(key, built, prefix)) is not None}
    mismatched = sorted((key, saved[key], built[name]) for key, name in found.items() if saved[key] != built[name])
    if found and not mismatched:
        return None
    missing = sorted(set(built) - set(found.values()))
    unexpected = sorted(set(saved) - set(found))
    return _describe(directory, model, missing, unexpected, mismatched)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers reads: those an index (model.safetensors.index.json) lists,
    else model.safetensors, else every one (a directory may hold others: Mistral's consolidated.safetensors)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):  # transformers says what is wrong with it
            return []
        return [directory / name for name in sorted(names) if (directory / name).is_file()]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    return sorted(directory.glob("*.safetensors"))


def _own_state(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's state dict by name and shape, a tied weight under its first name only."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tuple(tensor.shape)
    return out


def _model_key(key: str, built: dict[str, tuple[int, ...]], prefix: str) -> str | None:
    """The model's name for a saved weight: the same, or with the base model's prefix added or
    removed (a base model's weights load into a model with a head, and the other way round)."""
    candidates = [key]
    if prefix:
        candidates += [f"{prefix}.{key}", key.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in built), None)


def _describe(
    directory: Path,
    model: nn.Module,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str | None:
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if mismatched:
        shapes = [f"{key} {_shape(saved)} against {_shape(built)}" for key, saved, built in mismatched]
        parts.append(f"{len(mismatched)} of another shape in the files than by config.json ({_first(shapes)})")
    if missing:
        parts.append(f"{len(missing)} of the model's missing from the files ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} in the files that the model has no place for ({_first(unexpected)})")
    config = getattr(model, "config", None)
    kind = f"{type(model).__name__}, model_type {getattr(config, 'model_type', '?')}"
    return (
        f"the weights in {directory} do not fit the model its config.json describes ({kind}): "
        f"{'; '.join(parts)}: name a directory whose config.json came with its weights (save_pretrained "
        "writes both), or fix config.json"
    )


def _first(keys: Sequence[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def _shape(shape: Iterable[int] | torch.Size) -> str:
    return f"[{', '.join(map(str, shape))}]"
