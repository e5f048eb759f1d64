"""Data the shipped fine-tuning recipes make for themselves, so that they run offline from a clean
clone: sums of two numbers, as plain documents (`What is 17+25? 42`) and as chat (the question from
the user, `42` from the assistant), with a character-level tokenizer that has a chat template and
decodes `17+25=42` as `17+25=42` (its pieces fused, not joined with spaces). Written once into
`directory` (by local rank 0 of each node; the same seed writes the same files), then read like any
user's files:

    data:
      train: {_component_: launcher.datasets.examples.arithmetic_chat, split: train}

is `ChatData(files=data/arithmetic/chat_train.jsonl, tokenizer=data/arithmetic/tokenizer)`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from launcher.cluster import distributed
from launcher.datasets.chat import ChatData
from launcher.datasets.tokenized import TokenizedText
from launcher.errors import ArgumentError
from launcher.recipe.components import require

VERSION = 2  # bump when what is written changes: older material is then written again (2: documents
# in the chat's words, and a tokenizer that decodes without spaces between characters)
SPLITS = {"train": (2000, 0), "val": (200, 1)}  # samples, seed
CHARACTERS = list("0123456789+-=? ") + list("Whatis")
SPECIAL = ["<pad>", "<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def arithmetic_text(split: str = "train", directory: str = "data/arithmetic", max_length: int = 32) -> TokenizedText:
    """`What is a+b? c` documents, one per line of text_<split>.jsonl: the knowledge a base model
    pretrains on (recipes/hf_causal_lm.yaml), in the words the chat data asks in."""
    root = _written(Path(directory), split)
    return TokenizedText(
        files=str(root / f"text_{split}.jsonl"), tokenizer=str(root / "tokenizer"), max_length=max_length
    )


def arithmetic_chat(
    split: str = "train", directory: str = "data/arithmetic", max_length: int | None = 32, pack: int | None = None
) -> ChatData:
    """`What is a+b?` from the user, `c` from the assistant: only the answer (and its end marker) trains."""
    root = _written(Path(directory), split)
    return ChatData(
        files=str(root / f"chat_{split}.jsonl"), tokenizer=str(root / "tokenizer"), max_length=max_length, pack=pack
    )


def _written(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ArgumentError("split", f"{split!r} is not a split of the example data; use one of {sorted(SPLITS)}")
    marker = root / f".written-v{VERSION}"
    with distributed.local_main_first(f"examples/{root.resolve()}"):
        if not marker.is_file():
            root.mkdir(parents=True, exist_ok=True)
            for name, (count, seed) in SPLITS.items():
                sums = _sums(count, seed)
                _write_jsonl(root / f"text_{name}.jsonl", [{"text": f"What is {a}+{b}? {a + b}"} for a, b in sums])
                chats = [
                    [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
                    for a, b in sums
                ]
                _write_jsonl(root / f"chat_{name}.jsonl", [{"messages": m} for m in chats])
            _tokenizer().save_pretrained(root / "tokenizer")
            marker.touch()
            for older in root.glob(".written-v*"):  # markers this module wrote before: their material is replaced
                if older != marker:
                    older.unlink()
    return root


def _sums(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(50), rng.randrange(50)) for _ in range(count)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # a kill leaves the old file or none, never half of one


def _tokenizer() -> Any:
    """One token per character, the chat roles as special tokens, and the chat template."""
    tokenizers = require("tokenizers", "the example data's tokenizer")
    transformers = require("transformers", "the example data's tokenizer")
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARACTERS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()  # one string from the characters: WordLevel alone joins them with spaces
    tok.add_special_tokens(SPECIAL)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,  # decode gives back the text as written ("3 ?" keeps its space)
    )
    fast.chat_template = TEMPLATE
    return fast
