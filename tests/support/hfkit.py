"""Hugging Face test material made on the spot, offline: a word-level tokenizer trained on text this
module writes, JSON lines documents of varying length, and a tiny GPT-2 recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(60)]
SPECIAL = ["<pad>", "<unk>", "<|endoftext|>"]


def documents(n: int, seed: int = 0, min_words: int = 2, max_words: int = 30) -> list[str]:
    """Texts whose next word depends on the last one (something to learn), of varying lengths."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        word = rng.randrange(len(WORDS))
        out = []
        for _ in range(rng.randint(min_words, max_words)):
            out.append(WORDS[word])
            word = (word * 7 + rng.choice((1, 2))) % len(WORDS)
        docs.append(" ".join(out))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def make_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer trained on this module's words; saved as a transformers tokenizer
    directory (tokenizer.json inside, so both loaders work). Returns the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(documents(200, seed=123), trainers.WordLevelTrainer(special_tokens=SPECIAL))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)
    return directory


def tiny_gpt2(vocab_size: int = 64, n_positions: int = 64) -> dict:
    """The model section of a recipe: a 2-layer GPT-2 with 32-wide embeddings, no dropout."""
    config = {
        "_component_": "transformers.GPT2Config",
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 2,  # <|endoftext|>, as in GPT-2
        "eos_token_id": 2,
    }
    return {"_component_": "launcher.models.hf.causal_lm", "config": config}


def lm_recipe(tmp: Path, run_dir: Path, **data) -> dict:
    """A tiny GPT-2 fine-tuned on 37 padded documents: batch 4 per rank, global batch 16 (windows
    accumulate and the last one of each epoch is partial), the model's own loss (token-exact)."""
    tokenizer = tmp / "tokenizer"
    if not tokenizer.exists():
        make_tokenizer(tokenizer)
    train = tmp / "train.jsonl"
    if not train.exists():
        write_jsonl(train, documents(37, seed=1))
    val = tmp / "val.jsonl"
    if not val.exists():
        write_jsonl(val, documents(9, seed=2))
    text = {"_component_": "launcher.datasets.tokenized.TokenizedText", "tokenizer": str(tokenizer)}
    text["cache_dir"] = str(tmp / "hf-cache")
    return {
        "name": "hf-tiny",
        "seed": 0,
        "model": tiny_gpt2(),
        "data": {
            "train": {**text, "files": str(train), **data},
            "val": {**text, "files": str(val), **data},
            "batch_size": 4,
            "collate": {"_component_": "launcher.collate.PadToLongest"},
        },
        # SGD, not AdamW: attention's key bias has an exact gradient of 0 (softmax ignores a shift
        # of all its logits), and Adam scales that bias's float noise up to full-size steps
        # (measured: 1e-3 relative between 2 ranks and one process there, 1e-6 elsewhere)
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 2, "global_batch_size": 16},
        "log": {"every_n_steps": 1},
        "run": {"dir": str(run_dir)},
    }


CHAT_SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def byte_level_tokenizer(directory: Path, texts: list[str], vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer (every text encodes, and merges cross the chat template's seams, as
    real ones do) trained on `texts`, with the example chat template's role markers as special
    tokens; saved as a transformers tokenizer directory with that template. Returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from launcher.datasets.examples import TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIAL, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    eos = CHAT_SPECIAL[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(directory)
    return directory


def assert_same_export(out, expected) -> None:
    """Two save_pretrained directories hold the same files, tensors and settings."""
    import torch
    from safetensors.torch import load_file

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected.iterdir())
    for file in expected.iterdir():
        if file.suffix == ".safetensors":
            a, b = load_file(out / file.name), load_file(file)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file.name
        else:
            mine, theirs = (out / file.name).read_bytes(), file.read_bytes()
            assert mine == theirs, (
                f"{file.name}:\n{mine.decode(errors='replace')}\nvs\n{theirs.decode(errors='replace')}"
            )


def example_base(root: Path) -> Path:
    """A stand-in for what recipes/hf_causal_lm.yaml exports and recipes/sft_lora.yaml fine-tunes
    (root/runs/hf_causal_lm/hf), for tests that check sft_lora.yaml without pretraining first: that
    recipe's model from its config, untrained, with the example data's tokenizer."""
    import transformers
    import yaml

    from launcher.datasets import examples

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "hf_causal_lm.yaml"
    config = dict(yaml.safe_load(recipe.read_text())["model"]["config"])
    make = getattr(transformers, config.pop("_component_").rsplit(".", 1)[1])
    out = root / "runs" / "hf_causal_lm" / "hf"
    transformers.AutoModelForCausalLM.from_config(make(**config)).save_pretrained(out)
    examples._tokenizer().save_pretrained(out)
    return out
