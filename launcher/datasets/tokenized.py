"""Local text files (JSON lines, Parquet, plain text) tokenized once with a local tokenizer, through
Hugging Face `datasets` (the [hf] extra).

    data:
      train:
        _component_: launcher.datasets.tokenized.TokenizedText
        files: data/train.jsonl
        tokenizer: data/tokenizer        # a directory (AutoTokenizer) or a tokenizer.json file
        max_length: 512                  # longer documents are cut
      collate: {_component_: launcher.collate.PadToLongest}

or `pack: 512` to concatenate the documents (each followed by the tokenizer's end-of-text token, if
it has one) and cut the stream into samples of exactly 512 tokens: no padding, every label counts
(1000 documents at a time; each thousand's last partial sample is dropped).

Tokenizing runs once: rank 0 (of each node) tokenizes into `datasets`' cache while the other ranks
wait, then every rank opens the cached result. The cache key is the files' names, sizes and
modification times, the tokenizer file's contents and the arguments, so changing any of them
tokenizes again. `cache_dir` defaults to `datasets`' own (HF_DATASETS_CACHE).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from launcher import distributed
from launcher.components import require
from launcher.datasets.documents import batched, data_files, documents, first_bad_row
from launcher.errors import ArgumentError, positive


class TokenizedText(Dataset):
    deterministic = True  # no randomness in __getitem__

    def __init__(
        self,
        files: str | list[str],
        tokenizer: str,
        text_key: str = "text",
        max_length: int | None = None,
        pack: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        paths, self.format = data_files(files)
        self.max_length, self.pack = positive("max_length", max_length), positive("pack", pack)
        if max_length is not None and pack is not None:
            raise ArgumentError("pack", "give max_length (cut each document) or pack (join them), not both")
        self.paths, self.text_key = paths, text_key
        tok = load_tokenizer(tokenizer)
        self.vocab_size = tok.vocab_size  # the ids it can produce (launcher/data_fit.py)
        self.needs_padding = pack is None  # documents cut, not packed: of different lengths
        key = _cache_key(paths, tok.fingerprint, text_key, max_length, pack)
        with distributed.local_main_first(key):
            self.rows = self._tokenize(tok.encode, tok.eos, key, cache_dir)

    def _tokenize(self, encode: Callable, eos: int | None, key: str, cache_dir: str | None) -> Any:
        datasets = require("datasets", "launcher.datasets.tokenized.TokenizedText")
        files = [str(p) for p in self.paths]
        try:
            raw = datasets.load_dataset(self.format, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise _bad_file(self.paths, self.format, self.text_key, e) from None
        if self.text_key not in raw.column_names:
            raise ArgumentError("text_key", f"the files have no {self.text_key!r} field; they have {raw.column_names}")
        max_length, pack, text_key, fmt = self.max_length, self.pack, self.text_key, self.format
        if raw.cache_files:
            _remove_stale_temporaries(Path(raw.cache_files[0]["filename"]).parent)

        def tokenize(rows: dict[str, list]) -> dict[str, list]:
            texts = rows[text_key]
            if not all(isinstance(x, str) for x in texts):
                raise TypeError(f"a {text_key!r} that is not text")  # found again below, with its file and line
            ids = encode([x for x in texts if x.strip()] if fmt == "text" else texts)  # blank lines: no documents
            if pack is None:
                return {"input_ids": [x[:max_length] if max_length else x for x in ids]}
            stream = [t for x in ids for t in (x + [eos] if eos is not None else x)]
            return {"input_ids": [stream[i : i + pack] for i in range(0, len(stream) - pack + 1, pack)]}

        # packing works on batches of documents: a batch's last partial sample is dropped
        kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000, "new_fingerprint": key}
        try:
            rows = raw.map(tokenize, remove_columns=raw.column_names, desc="tokenizing", **kwargs)
        except Exception:  # a row that is not text, or not UTF-8: found again, with its file and line
            bad = first_bad_row(self.paths, self.text_key)
            if bad is None:
                raise
            raise bad from None
        return rows.with_format("torch")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]["input_ids"]}

    @property
    def tokens_per_sample(self) -> int | None:  # for tokens/s in the metrics (packed samples only)
        return self.pack

    @property
    def max_sequence_length(self) -> int:
        """The longest sample (launcher/data_fit.py checks it against the model's positions)."""
        if self.pack or self.max_length:
            return self.pack or self.max_length or 0
        import pyarrow.compute as pc  # installed with `datasets`

        column = self.rows.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py() or 0) if len(column) else 0


class StreamedText:
    """The same documents as TokenizedText, read line by line (launcher/datasets/documents.py) and
    tokenized as they are read, never cached: for corpora too big to tokenize ahead. A stream
    (launcher/streaming.py): the run needs train.max_steps; every rank reads it all and keeps its
    share. A bad row further on stops the run with its file and line."""

    def __init__(
        self, files: str | list[str], tokenizer: str, text_key: str = "text", max_length: int | None = None
    ) -> None:
        self.paths, self.format = data_files(files)
        self.text_key, self.max_length = text_key, positive("max_length", max_length)
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size  # the ids it can produce (launcher/data_fit.py)
        self.max_sequence_length = max_length  # unknown ahead when documents are not cut
        self.needs_padding = True
        next(documents(self.paths, text_key), None)  # the first document only: a stream is never read ahead

    def set_epoch(self, epoch: int) -> None:
        """Local files read alike on every pass."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a bad row: the documents before it first, so the run fails at that row's step
        for texts in batched(documents(self.paths, self.text_key), 256):
            yield from self._encoded(texts)

    def _encoded(self, texts: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        for ids in self.tokenizer.encode(texts):
            yield {"input_ids": torch.tensor(ids[: self.max_length] if self.max_length else ids)}


@dataclass(frozen=True)
class Tokenizer:
    """A local tokenizer, as this module and `launcher tokenize` use it."""

    encode: Callable[[list[str]], list[list[int]]]  # texts -> token ids, no special tokens added
    eos: int | None  # the end-of-text id put between packed documents, if the tokenizer has one
    vocab_size: int
    fingerprint: str  # sha256 of tokenizer.json: part of the tokenization cache's key


def load_tokenizer(spec: str) -> Tokenizer:
    """A directory save_pretrained wrote (AutoTokenizer, local files only), or a tokenizer.json file."""
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ArgumentError("tokenizer", f"{path} is neither a tokenizer.json file nor a directory with one")
    fingerprint = hashlib.sha256(file.read_bytes()).hexdigest()
    if path.is_dir():
        transformers = require("transformers", "a tokenizer directory")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # a damaged tokenizer.json or config: transformers' own errors vary
            raise ArgumentError("tokenizer", f"cannot load the tokenizer in {path} ({str(e)[:120]})") from None
        return Tokenizer(
            lambda texts: tok(texts, add_special_tokens=False)["input_ids"], tok.eos_token_id, len(tok), fingerprint
        )
    tokenizers = require("tokenizers", "a tokenizer.json file")
    try:
        raw = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exceptions for a file it cannot parse
        raise ArgumentError(
            "tokenizer", f"{file} is not a tokenizer.json ({str(e)[:120]}); name a tokenizer file"
        ) from None
    eos = next((raw.token_to_id(t) for t in EOS_NAMES if raw.token_to_id(t) is not None), None)
    return Tokenizer(
        lambda texts: [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)],
        eos,
        raw.get_vocab_size(),
        fingerprint,
    )


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")


def _cache_key(paths: list[Path], tokenizer: str, *args: Any) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps([stats, tokenizer, *args]).encode()).hexdigest()[:32]


STALE_S = 600.0  # a temporary file untouched this long belongs to no live writer: datasets writes as it maps


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """The `tmp*` files a killed tokenization left in datasets' cache (its map writes one, then renames it)."""
    now = time.time()
    for leftover in cache_dir.glob("tmp*"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and now - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()


def _bad_file(paths: list[Path], fmt: str, text_key: str, error: Exception) -> ArgumentError:
    """datasets' parse errors name neither file nor line: find them by reading the files ourselves."""
    return first_bad_row(paths, text_key) or ArgumentError(
        "files", f"cannot read {[str(p) for p in paths]} as {fmt}: {type(error).__name__}: {error}"
    )
