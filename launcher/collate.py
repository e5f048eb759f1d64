"""Built-in `data.collate` components: samples -> one batch.

data:
  collate: {_component_: launcher.collate.PadToLongest, pad_id: 0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from launcher.data.batches import ATTENTION_MASK, IGNORE_INDEX, LABELS, POSITION_IDS
from launcher.errors import ArgumentError

INPUT_IDS = "input_ids"


class PadToLongest:
    """Samples `{"input_ids": [...], "labels": [...]?}` (lists or 1-D tensors) -> a mapping batch
    padded on the right to the batch's longest sample (rounded up to `multiple_of`):
    `input_ids` (padded with `pad_id`), `attention_mask` (1 on tokens, 0 on padding) and `labels`
    (-100 on padding, which no loss counts; a sample without labels is labelled by its input_ids,
    as a causal LM's are). Any other key is padded with 0.

    Packed samples (`position_ids` restarting at 0 at each document, launcher/datasets/packing.py):
    each document's first token is labelled -100 (nothing before it in its document predicts it),
    and the batch keeps its `position_ids`, from which the model keeps attention inside each document
    (launcher/data/batches.py then gives the model no `attention_mask`, which here only marks the
    padding: at the right, no real token attends to it under causal attention)."""

    def __init__(self, pad_id: int = 0, multiple_of: int = 1) -> None:
        if multiple_of < 1:
            raise ArgumentError("multiple_of", f"must be at least 1, got {multiple_of}")
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples or not all(isinstance(s, Mapping) and INPUT_IDS in s for s in samples):
            raise ValueError(f"PadToLongest needs samples that are mappings with {INPUT_IDS!r}")
        rows = [{k: torch.as_tensor(v) for k, v in s.items()} for s in samples]
        for row in rows:
            row.setdefault(LABELS, row[INPUT_IDS])
            if POSITION_IDS in row:
                row[LABELS] = row[LABELS].masked_fill(row[POSITION_IDS] == 0, IGNORE_INDEX)
            row.setdefault(ATTENTION_MASK, torch.ones_like(row[INPUT_IDS]))
        longest = max(len(row[INPUT_IDS]) for row in rows)
        length = -(-longest // self.multiple_of) * self.multiple_of
        fill = {INPUT_IDS: self.pad_id, LABELS: IGNORE_INDEX}
        return {key: torch.stack([_pad(row[key], length, fill.get(key, 0)) for row in rows]) for key in rows[0]}


def _pad(values: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    out = torch.full((length,), fill, dtype=values.dtype)
    out[: len(values)] = values
    return out
