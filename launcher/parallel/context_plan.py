"""dist.context_parallel at `launcher check` (and at the start of a run): what it refuses before any
process group exists, and the plan's lines: the sequence each rank holds and its activations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from launcher.errors import RecipeError
from launcher.parallel import context_batches, context_models
from launcher.parallel.context import KEY, MIN_TORCH
from launcher.parallel.sharding import torch_version

if TYPE_CHECKING:
    from launcher.parallel.dims import ParallelDims
    from launcher.recipe.schema import Recipe

# Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer models"), table 2:
# a layer's activations are 34 s b h + 5 a s^2 b bytes at 16 bits, s tokens, b samples, h wide, a heads
BYTES_PER_TOKEN_WIDTH = 34
BYTES_PER_SCORE = 5


def check(recipe: Recipe) -> None:
    """What context parallelism cannot serve, one line each, before any model exists."""
    cp = recipe.dist.context_parallel
    if cp == 1:
        return
    if torch_version() < MIN_TORCH:
        raise RecipeError(
            KEY,
            f"context parallelism needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer (a device mesh's named, "
            f"flattened groups); this is torch {_torch()}: upgrade torch, or set {KEY}=1",
        )
    samples = recipe.train.loss_mean_over == "samples" or (recipe.train.loss_mean_over == "auto" and recipe.loss)
    refused = [
        (
            samples,
            "train.loss_mean_over",
            "a mean over each sample's tokens needs all of them, which no rank holds; a mean over tokens adds up "
            "exactly over the ranks (the same value as over samples for sequences of one length and no ignored "
            "label): set train.loss_mean_over=tokens",
        ),
        (
            recipe.train.compile,
            "train.compile",
            "the attention's all-gather of keys and values is not compiled (untested under torch.compile); set "
            "train.compile=false",
        ),
    ]
    for wrong, key, why in refused:
        if wrong:
            raise RecipeError(key, f"not supported with {KEY}={cp}: {why}")


def _torch() -> str:
    import torch

    return torch.__version__


def sequence_length(sample: Any, model: nn.Module) -> int | None:
    """A sample's tokens (a tuple's inputs, a mapping's input_ids), else the model's longest sequence."""
    ids = sample.get("input_ids") if isinstance(sample, dict) else sample[0] if isinstance(sample, tuple) else None
    if ids is not None and hasattr(ids, "shape") and len(ids.shape) == 1:
        return int(ids.shape[0])
    config = getattr(model, "config", None)
    for owner, name in ((model, "max_positions"), (config, "max_position_embeddings"), (config, "n_positions")):
        if isinstance(getattr(owner, name, None), int):
            return int(getattr(owner, name))
    return None


def check_sample(sample: Any, model: nn.Module, cp: int) -> None:
    """The model's attention can be replaced; a fixed-length sample (a tuple's) splits evenly."""
    if cp == 1:
        return
    context_models.check(model)
    if isinstance(sample, tuple) and hasattr(sample[0], "shape") and len(sample[0].shape) == 1:
        context_batches.check_length(int(sample[0].shape[0]), cp)


def plan_rows(
    model: nn.Module, dims: ParallelDims, micro_batch: int, sample: Any, recipe: Recipe
) -> list[tuple[str, str]]:
    """The sequence per rank, and the activations per rank at that length (an estimate); none
    without context parallelism. `sample`: the first training sample (None: not read here)."""
    cp, precision = dims.cp, recipe.train.precision
    if cp == 1:
        return []
    length = sequence_length(sample, model) if sample is not None else None
    if length is None:
        return [("context parallel", f"{cp} ranks per sequence (its length is not known here)")]
    local = -(-length // (2 * cp)) * 2  # padded to a multiple of 2 x cp: each rank 2 of its chunks
    rows = [
        ("context parallel", f"{cp} ranks per sequence of {length} tokens: {local} per rank (a head and a tail chunk)")
    ]
    shape = _shape(model)
    if shape is None:
        return rows
    width, layers, heads = shape
    scale = 2 if precision == "fp32" else 1  # the formula's bytes are 16-bit ones

    def activations(tokens: int, keys: int) -> int:
        per_layer = (
            BYTES_PER_TOKEN_WIDTH * tokens * micro_batch * width + BYTES_PER_SCORE * heads * tokens * keys * micro_batch
        )
        gathered = (
            4 * keys * micro_batch * width if keys > tokens else 0
        )  # the group's keys and values, kept for backward
        return layers * scale * (per_layer + gathered)

    mine, whole = activations(local, local * cp), activations(length, length)
    rows.append(
        (
            "activations per rank",
            f"~{_mib(mine)} MiB at {local} tokens x {micro_batch} samples ({_mib(whole)} MiB without context "
            "parallelism; estimate: Korthikanti et al. 2022, 34sbh + 5as^2b per layer, the scores against every key)",
        )
    )
    return rows


def _shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(width, layers, heads) of the built-in GPT or a transformers config."""
    blocks = [m for m in model.modules() if hasattr(type(m), context_models.ATTRIBUTE) and hasattr(m, "n_heads")]
    if blocks:
        first = blocks[0]
        return int(getattr(first.q, "in_features")), len(blocks), int(getattr(first, "n_heads"))  # noqa: B009
    config = getattr(model, "config", None)
    try:
        return int(config.hidden_size), int(config.num_hidden_layers), int(config.num_attention_heads)  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"
