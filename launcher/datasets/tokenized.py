"""Local text files (JSON lines, Parquet, plain text) tokenized once with a local tokenizer, through
Hugging Face `datasets` (the [hf] extra).

    data:
      train:
        _component_: launcher.datasets.tokenized.TokenizedText
        files: data/train.jsonl
        tokenizer: data/tokenizer        # a directory (AutoTokenizer) or a tokenizer.json file
        max_length: 512                  # longer documents are cut
      collate: {_component_: launcher.collate.PadToLongest}

or `pack: 512` to join the documents (each followed by the tokenizer's end-of-text token, if it has
one) into samples of 512 tokens, in one of two ways (`pack_documents`):

- `split` (the default): the stream of documents cut every 512 tokens. No padding, but a document
  may run on into the next sample (1000 documents at a time; each
  thousand's last partial sample is dropped).
- `whole`: consecutive documents joined while they fit in 512 tokens, never split (a longer one is
  cut to 512), and the samples padded to the longest of their batch. With document attention
  below, training then equals unpacked training on the same documents (tests/test_packing.py).

Either way each token attends only to its own document (packing.py: position ids that restart at 0
at each document, and at the start of a sample that a document runs on into); `pack_attention:
cross` lets attention cross the joins instead, as before.

Tokenizing runs once: rank 0 (of each node) tokenizes into `datasets`' cache while the other ranks
wait, then every rank opens the cached result. The cache key is the files' names, sizes and
modification times, the tokenizer file's contents and the arguments, so changing any of them
tokenizes again. `cache_dir` defaults to `datasets`' own (HF_DATASETS_CACHE).

A document of fewer than 2 tokens (after `max_length`) has nothing a causal LM can predict: such
documents are dropped, counted, and named in a warning at the start of the run (and by `launcher
check`), as ChatData does with conversations that have no answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from launcher import hub
from launcher.cluster import distributed
from launcher.datasets.documents import batched, documents, json_texts
from launcher.datasets.packing import DOCUMENT, POSITION_IDS, attention, packer, positions
from launcher.datasets.sources import LocalFiles, NamedDataset, cache_key, text_source
from launcher.errors import ArgumentError, LaunchError, positive
from launcher.recipe.components import require

SPLIT, WHOLE = "split", "whole"  # pack_documents' values


class TokenizedText(Dataset):
    deterministic = True  # no randomness in __getitem__

    def __init__(
        self,
        files: str | list[str] | None = None,
        tokenizer: str | None = None,
        text_key: str = "text",
        max_length: int | None = None,
        pack: int | None = None,
        pack_documents: str = SPLIT,
        pack_attention: str = DOCUMENT,
        cache_dir: str | None = None,
        dataset: str | None = None,
        name: str | None = None,
        split: str | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
    ) -> None:
        self.max_length, self.pack = positive("max_length", max_length), positive("pack", pack)
        if max_length is not None and pack is not None:
            raise ArgumentError("pack", "give max_length (cut each document) or pack (join them), not both")
        for argument, length in (("max_length", max_length), ("pack", pack)):
            if length == 1:
                raise ArgumentError(
                    argument, f"1 leaves samples of one token, which predict nothing; give {MIN_TOKENS} or more"
                )
        if tokenizer is None:
            raise ArgumentError("tokenizer", "name the tokenizer: a tokenizer.json file, a directory or a hub id")
        if pack_documents not in (SPLIT, WHOLE):
            raise ArgumentError(
                "pack_documents",
                f"{pack_documents!r} is not a way to pack: give {SPLIT!r} (the stream of documents cut every pack "
                f"tokens; the default) or {WHOLE!r} (whole documents joined while they fit, never split)",
            )
        self.whole = pack is not None and pack_documents == WHOLE
        self.documents = attention(pack_attention, pack)  # packed with position ids that restart
        self.source = text_source(files, dataset, name, split, revision)
        self.text_key = text_key
        tok = load_tokenizer(tokenizer, tokenizer_revision)
        self.tokenizer = tok  # saved beside the model at the end (hf/: AutoTokenizer loads it)
        self.vocab_size = tok.vocab_size  # the ids it can produce (launcher/data/fit.py)
        self.needs_padding = pack is None or self.whole  # samples of different lengths
        key = cache_key(self.source, tok.fingerprint, text_key, max_length, pack, self.whole, self.documents)
        with distributed.local_main_first(key):
            self.rows, short, total = self._tokenize(tok.encode, tok.eos, key, cache_dir)
        self.dropped = short
        # said at the start of the run and by `launcher check` (launcher/data/fit.py)
        self.notes = (
            [f"{short} of {total} documents have fewer than {MIN_TOKENS} tokens (nothing to predict) and are dropped"]
            if short
            else []
        )
        if total and short == total:  # not "the dataset is empty": say why
            raise ArgumentError("", f"{self.source.describe()}: every document is dropped: {self.notes[0]}")

    def _tokenize(self, encode: Callable, eos: int | None, key: str, cache_dir: str | None) -> tuple[Any, int, int]:
        """The tokenized samples kept; how many documents were too short to keep; how many in all."""
        datasets = require("datasets", "launcher.datasets.tokenized.TokenizedText")
        source = self.source
        raw = _raw(datasets, source, self.text_key, cache_dir)
        if self.text_key not in raw.column_names:
            raise ArgumentError(
                "text_key", f"{source.describe()} has no {self.text_key!r} field; it has {raw.column_names}"
            )
        max_length, pack, text_key = self.max_length, self.pack, self.text_key
        documents, whole = self.documents, self.whole
        fmt = getattr(source, "format", "")
        if raw.cache_files:
            _remove_stale_temporaries(Path(raw.cache_files[0]["filename"]).parent)

        def tokenize(rows: dict[str, list]) -> dict[str, list]:
            texts = rows[text_key]
            if not all(isinstance(x, str) for x in texts):
                raise TypeError(f"a {text_key!r} that is not text")  # found again below, with its file and line
            ids = encode([x for x in texts if x.strip()] if fmt == "text" else texts)  # blank lines: no documents
            if pack is None:
                return {"input_ids": [x[:max_length] if max_length else x for x in ids]}
            ended = [x + [eos] if eos is not None else x for x in ids]
            if whole:  # documents cut to pack here, dropped if short and joined below
                return {"input_ids": [x[:pack] for x in ended]}
            return _stream_cut(ended, pack, documents)

        # packing works on batches of documents: a batch's last partial sample is dropped
        kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000, "new_fingerprint": key}
        try:
            rows = raw.map(tokenize, remove_columns=raw.column_names, desc="tokenizing", **kwargs)
        except Exception:  # a row that is not text, or not UTF-8: found again, with its file and line
            bad = source.bad_row(self.text_key)
            if bad is None:
                raise
            raise bad from None
        if pack is not None and not whole:
            return rows.with_format("torch"), 0, len(rows)
        import pyarrow.compute as pc  # installed with `datasets`

        lengths = pc.list_value_length(rows.data.column("input_ids"))
        short = int(pc.sum(pc.less(lengths, MIN_TOKENS)).as_py() or 0)
        if short:
            rows = rows.filter(
                lambda ids: [len(x) >= MIN_TOKENS for x in ids],
                input_columns="input_ids",
                batched=True,
                new_fingerprint=f"{key}-kept",
            )
        if whole:
            assert pack is not None
            rows = rows.map(packer(pack, documents), batched=True, batch_size=1000, new_fingerprint=f"{key}-packed")
        return rows.with_format("torch"), short, len(lengths)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {k: row[k] for k in ("input_ids", POSITION_IDS) if k in row}

    @property
    def tokens_per_sample(self) -> int | None:  # for tokens/s in the metrics (samples of pack tokens only)
        return None if self.whole else self.pack

    @property
    def max_sequence_length(self) -> int:
        """The longest sample (launcher/data/fit.py checks it against the model's positions)."""
        if self.pack or self.max_length:
            return self.pack or self.max_length or 0
        import pyarrow.compute as pc  # installed with `datasets`

        column = self.rows.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py() or 0) if len(column) else 0


def _stream_cut(ended: list[list[int]], pack: int, documents: bool) -> dict[str, list]:
    """Documents (end-of-text tokens included) joined and cut every `pack` tokens (the last partial
    sample dropped); `documents`: with position ids restarting at each document and each sample."""
    stream = [t for x in ended for t in x]
    starts = range(0, len(stream) - pack + 1, pack)
    out = {"input_ids": [stream[i : i + pack] for i in starts]}
    if documents:
        at = positions([len(x) for x in ended])
        out[POSITION_IDS] = [_restarted(at[i : i + pack]) for i in starts]
    return out


def _restarted(at: list[int]) -> list[int]:
    """A sample's position ids, those of the document it begins inside restarting at 0 too."""
    first = at[0]
    run = next((i for i, p in enumerate(at) if p == 0), len(at))
    return [p - first for p in at[:run]] + at[run:]


MIN_TOKENS = 2  # a causal LM predicts each token from those before it: one token predicts nothing


class StreamedText:
    """The same documents as TokenizedText, read line by line (launcher/datasets/documents.py), or a
    named dataset streamed by `datasets` (`load_dataset(..., streaming=True)`), and tokenized as they
    are read, never cached: for corpora too big to tokenize ahead. A stream
    (launcher/data/streaming.py): the run needs train.max_steps; every rank reads it all and keeps its
    share. A bad row further on stops the run with its file and line."""

    def __init__(
        self,
        files: str | list[str] | None = None,
        tokenizer: str | None = None,
        text_key: str = "text",
        max_length: int | None = None,
        dataset: str | None = None,
        name: str | None = None,
        split: str | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
    ) -> None:
        if tokenizer is None:
            raise ArgumentError("tokenizer", "name the tokenizer: a tokenizer.json file, a directory or a hub id")
        self.source = text_source(files, dataset, name, split, revision, streaming=True)
        self.text_key, self.max_length = text_key, positive("max_length", max_length)
        self.tokenizer = load_tokenizer(tokenizer, tokenizer_revision)
        self.vocab_size = self.tokenizer.vocab_size  # the ids it can produce (launcher/data/fit.py)
        self.max_sequence_length = max_length  # unknown ahead when documents are not cut
        self.needs_padding = True
        next(self._documents(), None)  # the first document only: a stream is never read ahead

    def set_epoch(self, epoch: int) -> None:
        """Local files (and a cached snapshot) read alike on every pass."""

    def _documents(self) -> Iterator[str]:
        if isinstance(self.source, LocalFiles):
            yield from documents(self.source.paths, self.text_key)
            return
        rows = self.source.load(require("datasets", "StreamedText"), None, streaming=True)
        for number, row in enumerate(rows, 1):
            text = row.get(self.text_key)
            if not isinstance(text, str):
                what = f"has no {self.text_key!r} field (it has {sorted(row)})" if text is None else "is not text"
                raise ArgumentError("text_key", f"{self.source.describe()}, row {number}: {self.text_key!r} {what}")
            if text.strip():
                yield text

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a bad row: the documents before it first, so the run fails at that row's step
        for texts in batched(self._documents(), 256):
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
    source: Path  # the directory or tokenizer.json file it was read from

    def save_into(self, directory: Path) -> None:
        """Beside a save_pretrained model, so that AutoTokenizer.from_pretrained(directory) gives this
        tokenizer: a tokenizer directory's files (its config and chat template included), or the
        tokenizer.json file."""
        if self.source.is_dir():
            for file in sorted(p for p in self.source.iterdir() if p.is_file()):
                if file.name.startswith("tokenizer") or file.name in TOKENIZER_FILES or file.suffix == ".jinja":
                    shutil.copyfile(file, directory / file.name)
            return
        # a bare tokenizer.json: AutoTokenizer would guess a class from the model's type and mis-encode;
        # saved as a PreTrainedTokenizerFast, with its end-of-text token, it loads as it was read
        transformers = require("transformers", "saving the tokenizer beside the model")
        tokenizers = require("tokenizers", "a tokenizer.json file")
        raw = tokenizers.Tokenizer.from_file(str(self.source))
        eos = next((t for t in EOS_NAMES if raw.token_to_id(t) is not None), None)
        transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos).save_pretrained(directory)


# what a tokenizer directory holds besides tokenizer*.json (vocabularies, special tokens, a chat template)
TOKENIZER_FILES = frozenset(
    {"special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json"}
)


def load_tokenizer(spec: str, revision: str | None = None) -> Tokenizer:
    """A directory save_pretrained wrote (AutoTokenizer, local files only), a tokenizer.json file, or a
    hub id (at `revision`) whose tokenizer files are fetched once per node into the hub's cache."""
    what = "a local tokenizer (a tokenizer.json file or a directory with one)"
    path = hub.resolve(spec, "tokenizer", what=what, revision=revision, files=hub.TOKENIZER_FILES).path
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
            lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
            len(tok),
            fingerprint,
            path,
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
        file,
    )


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")


STALE_S = 600.0  # a temporary file untouched this long belongs to no live writer: datasets writes as it maps


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """The `tmp*` files a killed tokenization left in datasets' cache (its map writes one, then renames it)."""
    now = time.time()
    for leftover in cache_dir.glob("tmp*"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and now - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()


def _raw(datasets: Any, source: LocalFiles | NamedDataset, text_key: str, cache_dir: str | None) -> Any:
    try:
        if isinstance(source, LocalFiles) and source.format == "json":
            return json_texts(datasets, source.paths, text_key, source.identity(), cache_dir)
        return source.load(datasets, cache_dir)
    except (ArgumentError, LaunchError):  # already one line (a cache that cannot be written names its variable)
        raise
    except Exception as e:
        raise _unreadable(source, text_key, e) from None


def _unreadable(source: LocalFiles | NamedDataset, text_key: str, error: Exception) -> ArgumentError:
    """datasets' parse errors name neither file nor line: found by reading the files ourselves."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return source.bad_row(text_key) or ArgumentError(
        "files" if isinstance(source, LocalFiles) else "dataset",
        f"cannot read {source.describe()}: {type(error).__name__}: {first}",
    )
