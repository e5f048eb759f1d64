"""A Hugging Face hub cache laid out by hand, as `huggingface_hub` writes it: for each repository,
`<type>s--<org>--<name>/` with the files under `blobs/` (named by their sha256), a snapshot
directory of links to them named by the commit, and `refs/main` holding that commit. With
HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing here, hub ids resolve through the library's own code."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_repo(cache: Path, repo_id: str, source: Path, repo_type: str = "model") -> Path:
    """Every file under `source` as the repository's one commit; returns the snapshot directory."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    snapshot = folder / "snapshots" / commit
    for file in files:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = folder / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(file.relative_to(source).parts)) / ".." / "blobs" / digest)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def stand_ins(cache: Path, work: Path) -> Path:
    """Tiny stand-ins, under the real ids, for what recipes/sft_lora_hub.yaml names: Qwen/Qwen2.5-0.5B
    as its config (Qwen2's vocabulary, tiny layers; no weights: `launcher check` reads none) with the
    example character tokenizer and chat template, and HuggingFaceH4/no_robots as Parquet train and
    test splits of `messages`. `launcher check` of the recipe then runs offline through the hub code."""
    from transformers import Qwen2Config

    from launcher.datasets import examples

    model = work / "qwen"
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.save_pretrained(model)
    examples._tokenizer().save_pretrained(model)
    add_repo(cache, "Qwen/Qwen2.5-0.5B", model)
    chats = work / "no_robots"
    for split, (a, b) in (("train", (1, 2)), ("test", (3, 4))):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        ]
        write_parquet(chats / "data" / f"{split}-00000-of-00001.parquet", rows * 16)
    add_repo(cache, "HuggingFaceH4/no_robots", chats, repo_type="dataset")
    return cache
