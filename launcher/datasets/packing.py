"""Packed samples: documents (or conversations) joined into one sequence, each token attending only
to the tokens of its own document.

A packed sample carries `position_ids` that restart at 0 at each document. That is all a model
needs to keep attention inside each document (TRL's padding-free packing, torchtitan's
`block_causal`): transformers models derive the document mask from position ids that restart
(`masking_utils.find_packed_sequence_indices`, for sdpa, eager and flex; varlen flash attention on
CUDA), and the built-in GPT builds its own (launcher/models/gpt.py). The collate
(launcher/collate.py) then labels each document's first token -100: nothing before it in its
document predicts it. Packed this way, training equals unpacked training on the same documents.

`pack_attention: cross` keeps the old packing instead: no position ids, so positions run through the
whole sample and attention crosses the joins (a packed token also sees the documents before it).
"""

from __future__ import annotations

from collections.abc import Callable

from launcher.errors import ArgumentError

POSITION_IDS = "position_ids"
DOCUMENT, CROSS = "document", "cross"  # pack_attention's values


def attention(value: str, pack: int | None) -> bool:
    """Whether packed samples carry document position ids (`pack_attention`, checked)."""
    if value not in (DOCUMENT, CROSS):
        raise ArgumentError(
            "pack_attention",
            f"{value!r} is not an attention for packed samples: give {DOCUMENT!r} (each token attends to its own "
            f"document; the default) or {CROSS!r} (attention crosses the joins, as before document masks)",
        )
    if value == CROSS and pack is None:
        raise ArgumentError("pack_attention", f"{CROSS!r} applies to packed samples: give pack too, or leave it out")
    return pack is not None and value == DOCUMENT


def positions(lengths: list[int]) -> list[int]:
    """Position ids of documents of these lengths, joined: 0..n-1 for each."""
    return [i for n in lengths for i in range(n)]


def packer(size: int, documents: bool) -> Callable[[dict[str, list]], dict[str, list]]:
    """Consecutive rows joined while they fit in `size` tokens (each already at most `size`), every
    column alike (`input_ids`, and `labels` where there are some); `documents`: with their position ids."""

    def pack(rows: dict[str, list]) -> dict[str, list]:
        columns = list(rows)
        out: dict[str, list] = {c: [] for c in columns}
        if documents:
            out[POSITION_IDS] = []
        joined: dict[str, list] = {c: [] for c in columns}
        lengths: list[int] = []

        def flush() -> None:
            for c in columns:
                out[c].append(joined[c])
                joined[c] = []
            if documents:
                out[POSITION_IDS].append(positions(lengths))
            lengths.clear()

        for row in zip(*(rows[c] for c in columns), strict=True):
            n = len(row[0])
            if lengths and sum(lengths) + n > size:
                flush()
            for c, values in zip(columns, row, strict=True):
                joined[c].extend(values)
            lengths.append(n)
        if lengths:
            flush()
        return out

    return pack
