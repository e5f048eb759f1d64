"""A batch's part on one rank of a context-parallel group (launcher/parallel/context.py): every
tensor along the sequence, the head and the tail chunk of it, on the CPU, before the loop counts the
rank's valid tokens.

What the split adds, so the part computes what the whole would:
- `position_ids`, where the batch has none: each token's global position (the positional embedding
  and the rotary one read them; without, a rank's tokens would be given positions 0, 1, ...);
- `shift_labels`, where the model computes its own next-token loss: the labels shifted by one over
  the whole sequence, since a rank's part cannot shift across the chunks it does not hold;
- padding at the right to a multiple of 2 x cp, for a mapping batch (padded to its longest sample
  by its collate): input 0, labels -100, mask 0, position 0, which no real token attends to and no
  loss counts. A tuple `(inputs, targets)` of fixed-length sequences must divide as it is."""

from __future__ import annotations

from typing import Any

import torch

from launcher.data.batches import IGNORE_INDEX, LABELS, POSITION_IDS, SHIFTED_LABELS, is_mapping
from launcher.errors import RecipeError
from launcher.parallel.context import KEY, chunk_index

PAD = {LABELS: IGNORE_INDEX, SHIFTED_LABELS: IGNORE_INDEX}  # every other key pads with 0


def split(batch: Any, size: int, rank: int, shift: bool, to: int | None = None, positions: bool = True) -> Any:
    """`rank`'s part of `batch` (module doc); `to`: the sequences are padded to this length first
    (a pipeline's one shape); `positions`: give a mapping batch its global positions where it has
    none (not for pipeline stages, which take token ids alone and compute them)."""
    if is_mapping(batch):
        return _split_mapping(dict(batch), size, rank, shift, to, positions)
    inputs, targets = batch[0], batch[1]
    length = _length(inputs, "the inputs")
    if not isinstance(targets, torch.Tensor) or targets.dim() < 2 or targets.size(1) != length:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise RecipeError(
            KEY,
            f"splits sequences, but the targets ({shape}) are not one per token of the inputs ({tuple(inputs.shape)}); "
            "use it with token targets (a language model), or set dist.context_parallel=1",
        )
    if to is not None and to > length:  # a pipeline's one shape: padded first, then split
        inputs, targets = _padded(inputs, to, 0), _padded(targets, to, IGNORE_INDEX)
        length = to
    if length % (2 * size):
        raise _indivisible(length, size)
    index = chunk_index(length, size, rank)
    return type(batch)([inputs.index_select(1, index), targets.index_select(1, index), *batch[2:]])


def _padded(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.cat([t, t.new_full((t.size(0), length - t.size(1), *t.shape[2:]), value)], 1)


def _split_mapping(
    batch: dict[str, Any], size: int, rank: int, shift: bool, to: int | None, positions: bool
) -> dict[str, Any]:
    ids: Any = batch.get("input_ids")
    length = _length(ids, "input_ids")
    rows = ids.size(0)
    if POSITION_IDS in batch:
        check_documents(batch[POSITION_IDS])
    elif positions:
        batch[POSITION_IDS] = torch.arange(length).expand(rows, length)
    if shift and LABELS in batch and SHIFTED_LABELS not in batch:
        labels = batch[LABELS]
        batch[SHIFTED_LABELS] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    padded = -(-max(length, to or 0) // (2 * size)) * 2 * size
    index = chunk_index(padded, size, rank)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.size(1) == length:
            if padded > length:
                value = _padded(value, padded, PAD.get(key, 0))
            value = value.index_select(1, index)
        out[key] = value
    return out


def check_documents(positions: torch.Tensor) -> None:
    """A packed sample's documents must each start at position 0 (or open the sample), as the
    launcher packs them: the mask reads a query's document start as its index minus its position."""
    step = torch.diff(positions, dim=-1)
    starts = positions[:, 1:][step != 1]
    if bool((starts != 0).any()):
        raise RecipeError(
            KEY,
            f"a packed sample has a document starting at position id {int(starts[starts != 0][0])}: context "
            "parallelism finds a document's start from its position ids, which must restart at 0 at each "
            "document (as the launcher's packing makes them); fix the data's position_ids",
        )


def _length(ids: Any, what: str) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise RecipeError(
            KEY,
            f"splits every sample's sequence, but {what} are {shape}, not [samples, tokens]; use it with a language "
            "model's token data, or set dist.context_parallel=1",
        )
    return int(ids.size(1))


def _indivisible(length: int, size: int) -> RecipeError:
    return RecipeError(
        KEY,
        f"{size} splits each sequence into 2 x {size} = {2 * size} chunks (a head and a tail per rank), but the "
        f"sequences are {length} tokens; use a sequence length divisible by {2 * size}",
    )


def check_length(length: int, size: int) -> None:
    """`launcher check`: a fixed sequence length that the ranks cannot share evenly."""
    if size > 1 and length % (2 * size):
        raise _indivisible(length, size)
