"""`launcher tokenize TEXT... --tokenizer DIR -o tokens.bin`: text files -> one flat token file.

The file is what `launcher.datasets.token_file.TokenFile` reads: token ids back to back, uint16
when the tokenizer's vocabulary fits (else uint32), no header, each document followed by the
tokenizer's end-of-text token if it has one. Input is read a line at a time for .txt files (a
document per line, or `--whole-files`: one per file) and a `text` field per line for .jsonl; the
output is written as it goes, so neither has to fit in memory. Written to a temporary file and
renamed at the end: an interrupted run leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import EXIT_OK, LaunchError

BATCH = 1000  # documents per tokenizer call


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="write text files as one flat token file (for launcher.datasets.token_file.TokenFile)",
        description="Tokenize text files into one flat uint16/uint32 token file for pretraining.",
    )
    p.add_argument("inputs", nargs="+", metavar="TEXT", help=".txt (a document per line) or .jsonl files")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (AutoTokenizer) or tokenizer.json")
    p.add_argument("-o", "--output", required=True, help="the token file to write")
    p.add_argument("--text-key", default="text", help="the field holding the text in .jsonl files")
    p.add_argument("--whole-files", action="store_true", help=".txt: each file is one document")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from launcher.datasets.tokenized import load_tokenizer
    from launcher.errors import ArgumentError

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LaunchError("--output", f"{out} exists; pass --overwrite to replace it, or name another file")
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        if not path.is_file():
            raise LaunchError("TEXT", f"{path} does not exist")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except ArgumentError as e:
        raise LaunchError("--tokenizer", str(e)) from None
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = out.with_name(f".{out.name}.tmp")
    n_tokens = n_docs = 0
    try:
        with tmp.open("wb") as f:
            for docs in _batches(_documents(inputs, args.text_key, args.whole_files)):
                for ids in tokenizer.encode(docs):
                    if tokenizer.eos is not None:
                        ids = [*ids, tokenizer.eos]
                    np.asarray(ids, dtype=dtype).tofile(f)
                    n_tokens += len(ids)
                n_docs += len(docs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"{out}: {n_tokens:,} tokens from {n_docs:,} documents, {np.dtype(dtype).name} "
        f"(vocabulary {tokenizer.vocab_size:,}: set the model's vocab_size to at least that)"
    )
    return EXIT_OK


def _documents(inputs: list[Path], text_key: str, whole_files: bool) -> Iterator[str]:
    for path in inputs:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_key]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise LaunchError("TEXT", f"{path}:{number}: no {text_key!r} text ({e})") from None
        elif whole_files:
            yield path.read_text(encoding="utf-8")
        else:
            with path.open(encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
