"""`launcher tokenize TEXT... --tokenizer DIR -o tokens.bin`: text files -> one flat token file.

The file is what `launcher.datasets.token_file.TokenFile` reads: token ids back to back, uint16
when the tokenizer's vocabulary fits (else uint32), no header, each document followed by the
tokenizer's end-of-text token if it has one. Input is read as TokenizedText reads it
(launcher/datasets/documents.py: .txt a document per line, or `--whole-files` one per file; .jsonl
and .json a `text` field per line; .parquet a `text` column), a row at a time, and the output is
written as it goes, so neither has to fit in memory. Written to a temporary file of its own, its
size checked, then renamed: an interrupted or concurrent run, or a full disk, leaves no partial
output under the name.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
from pathlib import Path

from launcher.errors import EXIT_OK, LaunchError
from launcher.storage import why_write_failed

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

    from launcher.datasets.documents import batched, data_files, documents
    from launcher.datasets.tokenized import load_tokenizer
    from launcher.errors import ArgumentError

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LaunchError("--output", f"{out} exists; pass --overwrite to replace it, or name another file")
    if not out.parent.is_dir():
        raise LaunchError("--output", f"{out.parent} is not a directory")
    try:
        paths, _ = data_files(args.inputs, key="TEXT", one_format=False)
        tokenizer = load_tokenizer(args.tokenizer)
    except ArgumentError as e:
        raise LaunchError("TEXT" if e.argument == "TEXT" else "--tokenizer", str(e)) from None
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    _remove_dead_temporaries(out)
    # a name of its own (with the writer's pid): two runs writing the same output never share one
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    tmp = Path(name)
    n_tokens = n_docs = 0
    try:
        with os.fdopen(fd, "wb") as f:
            progress = _Progress(out)
            for docs in batched(documents(paths, args.text_key, args.whole_files), BATCH):
                for ids in tokenizer.encode(docs):
                    if tokenizer.eos is not None:
                        ids = [*ids, tokenizer.eos]
                    f.write(np.asarray(ids, dtype=dtype).tobytes())  # raises on a full disk (tofile can lose writes)
                    n_tokens += len(ids)
                n_docs += len(docs)
                progress.update(n_docs, n_tokens)
            progress.close()
            f.flush()
            os.fsync(f.fileno())
        written = tmp.stat().st_size
        if written != n_tokens * dtype.itemsize:
            raise OSError(errno.EIO, f"{written:,} bytes on disk of {n_tokens * dtype.itemsize:,}")
        os.replace(tmp, out)
    except ArgumentError as e:
        raise LaunchError("--text-key" if e.argument == "text_key" else "TEXT", str(e)) from None
    except OSError as e:
        raise LaunchError("--output", f"{why_write_failed(out, e)}; nothing was written under that name") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"{out}: {n_tokens:,} tokens from {n_docs:,} documents, {dtype.name} "
        f"(vocabulary {tokenizer.vocab_size:,}: set the model's vocab_size to at least that)"
    )
    return EXIT_OK


class _Progress:
    """Documents and tokens so far, on stderr: a tqdm bar on a terminal, else a line every 30 s."""

    def __init__(self, out: Path) -> None:
        from tqdm import tqdm

        self.tty, self.last, self.time = sys.stderr.isatty(), time.monotonic(), time.monotonic
        self.bar = tqdm(desc=f"tokenizing into {out.name}", unit=" docs", disable=not self.tty)

    def update(self, n_docs: int, n_tokens: int) -> None:
        if self.tty:
            self.bar.update(n_docs - self.bar.n)
            self.bar.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)
        elif self.time() - self.last >= 30:
            self.last = self.time()
            print(f"tokenize: {n_docs:,} documents, {n_tokens:,} tokens so far", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _remove_dead_temporaries(out: Path) -> None:
    """The temporary files of earlier runs to `out` that were killed (their pid is gone)."""
    for leftover in out.parent.glob(f".{out.name}.*.tmp"):
        pid = leftover.name[len(out.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
