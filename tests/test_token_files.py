"""Pretraining-scale token files (issue #14): `launcher tokenize` writes them, TokenFile reads them
memory-mapped (a file bigger than the memory budget trains without the process growing with it),
and recipes/pretrain_tokens.yaml trains on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, TINY_GPT_SHAPE, launcher
from hfkit import documents, make_tokenizer, write_jsonl
from launcher.datasets.token_file import TokenFile


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def test_tokenize_writes_every_documents_tokens_then_end_of_text(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    docs = documents(50, seed=3)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    (tmp_path / "b.txt").write_text("\n".join(docs[20:]) + "\n")
    out = tmp_path / "tokens.bin"
    proc = launcher("tokenize", tmp_path / "a.jsonl", tmp_path / "b.txt", "--tokenizer", tokenizer, "-o", out)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    expected = [t for d in docs for t in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert f"{len(expected):,} tokens from 50 documents, uint16" in proc.stdout
    again = launcher("tokenize", tmp_path / "a.jsonl", "--tokenizer", tokenizer, "-o", out)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr.strip().splitlines()[-1]


def test_windows_are_next_token_pairs_and_random_ones_depend_only_on_seed_and_index(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    seq = TokenFile(str(path), seq_len=10)
    assert len(seq) == 99
    x, y = seq[3]
    assert x.tolist() == list(range(30, 40)) and y.tolist() == list(range(31, 41))
    a, b = (
        TokenFile(str(path), 10, windows="random", samples=7, seed=1),
        TokenFile(str(path), 10, windows="random", samples=7, seed=1),
    )
    assert len(a) == 7 and [a.start(i) for i in range(7)] == [b.start(i) for i in range(7)]
    assert len({a.start(i) for i in range(7)}) > 1 and all(0 <= a.start(i) <= 1000 - 11 for i in range(7))


def test_a_token_file_bigger_than_the_memory_budget_trains_without_reading_it_whole(tmp_path):
    """A 3 GiB file (sparse: zeros, with random tokens where the windows fall) under a 1.5 GiB budget
    for the whole training process: a dataset that read the file would hold 3 GiB more."""
    path = tmp_path / "big.bin"
    n_tokens = 3 * 2**30 // 2
    with path.open("wb") as f:
        f.truncate(n_tokens * 2)
    data = TokenFile(str(path), seq_len=16, windows="random", samples=64)
    with path.open("r+b") as f:  # real tokens in every window the run reads
        for i in range(len(data)):
            f.seek(data.start(i) * 2)
            f.write(np.random.default_rng(i).integers(0, 64, 17).astype(np.uint16).tobytes())
    proc = launcher(
        "run",
        ROOT / "recipes" / "pretrain_tokens.yaml",
        f"run.dir={tmp_path / 'run'}",
        f"data.train.path={path}",
        f"data.val.path={path}",
        "data.val.windows=random",
        "data.val.samples=8",
        "data.train.samples=64",
        "data.num_workers=0",
        "train.max_steps=4",
        "train.global_batch_size=16",
        "train.precision=fp32",
        "train.warmup_steps=0",
        "scheduler.T_max=4",
        "data.batch_size=8",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["max_rss_gib"] for r in rows if "max_rss_gib" in r)
    assert peak < 1.5, f"peak resident memory {peak:.2f} GiB for a 3 GiB token file"
    assert rows[-1]["step"] == 4 and rows[-1]["val_loss"] < 4.5  # below uniform over 64 tokens (4.16) + noise


TINY = ["model.vocab_size=64", *TINY_GPT_SHAPE]
