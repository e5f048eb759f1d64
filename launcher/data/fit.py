"""Does the data fit the model? Token ids below the model's vocabulary, sequences within its
positions, the padding id a real token. Each would otherwise fail only at the first step, as an
IndexError on every rank (a device assert on a GPU); here it is one line at `launcher check` and
before the workers train.

What a model and a dataset say of themselves:
- the model: a transformers model's input embeddings and `config.n_positions` (learned positions,
  GPT-2's family; rotary models extrapolate and are not limited here), or the built-in GPT's
  `vocab_size` and `max_positions`;
- the dataset: `needs_padding` (samples of different lengths), `vocab_size` (the ids a tokenizer
  can produce), `max_token_id()` (a token file's largest id, read once per node), `max_sequence_length`
  (the longest sample it yields).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from launcher.cluster import distributed
from launcher.errors import RecipeError


def model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, maximum sequence length) of the model; None where it has no such limit."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        embeddings = get_embeddings()
        vocab = getattr(embeddings, "num_embeddings", None)
        return vocab, getattr(getattr(model, "config", None), "n_positions", None)
    return getattr(model, "vocab_size", None), getattr(model, "max_positions", None)


def check(model: nn.Module, datasets: dict[str, Any], collate: Any) -> None:
    """Every dataset (by recipe key) and the collate against the model; RecipeError on a misfit."""
    vocab, positions = model_limits(model)
    for key, ds in datasets.items():
        if ds is None:
            continue
        if collate is None and getattr(ds, "needs_padding", False):
            raise RecipeError(
                "data.collate",
                f"{key} yields samples of different lengths, which torch's default collate cannot stack; "
                "add data.collate: {_component_: launcher.collate.PadToLongest}",
            )
        length = getattr(ds, "max_sequence_length", None)
        if positions is not None and isinstance(length, int) and length > positions:
            raise RecipeError(
                key,
                f"samples of up to {length} tokens, but the model has {positions} positions; "
                f"cut them (max_length, pack or seq_len at most {positions}) or give the model more positions",
            )
        if vocab is None:
            continue
        data_vocab = getattr(ds, "vocab_size", None)
        if isinstance(data_vocab, int) and data_vocab > vocab:
            raise RecipeError(
                key,
                f"the tokenizer has {data_vocab:,} tokens but the model's vocabulary is {vocab:,}; "
                f"set the model's vocab_size to at least {data_vocab:,}",
            )
        max_id = (
            # once per node, not once per rank: a token file is read whole for it
            distributed.once_per_node(f"max_token_id/{key}", functools.partial(ds.max_token_id, vocab))
            if callable(getattr(ds, "max_token_id", None))
            else None
        )
        if max_id is not None and max_id >= vocab:
            raise RecipeError(
                key,
                f"{getattr(ds, 'path', 'the data')} holds token id {max_id:,}, beyond the model's vocabulary of "
                f"{vocab:,}; set the model's vocab_size to at least {max_id + 1:,}, or check the file's dtype",
            )
    pad_id = getattr(collate, "pad_id", None)
    if vocab is not None and isinstance(pad_id, int) and not 0 <= pad_id < vocab:
        raise RecipeError(
            "data.collate.pad_id", f"{pad_id} is not a token of the model's vocabulary (0 to {vocab - 1})"
        )


def notes(datasets: dict[str, Any]) -> list[str]:
    """What the datasets (by recipe key) say of themselves that the user should read: a dataset's
    `notes` (e.g. conversations dropped for want of an answer token), for `check` and the run's start."""
    return [f"{key}: {note}" for key, ds in datasets.items() if ds is not None for note in getattr(ds, "notes", [])]
