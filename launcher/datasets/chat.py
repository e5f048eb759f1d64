"""Chat and instruction data for supervised fine-tuning: conversations formatted with the tokenizer's
chat template, and only the assistant's tokens trained on (every other label is -100).

    data:
      train:
        _component_: launcher.datasets.chat.ChatData
        files: data/chat.jsonl         # one {"messages": [{"role": ..., "content": ...}, ...]} per line
        tokenizer: Qwen/Qwen2.5-0.5B   # a hub id, a tokenizer directory, or a tokenizer.json file
        max_length: 1024               # longer conversations are cut (see below)
      collate: {_component_: launcher.collate.PadToLongest}

or `prompt_key: prompt` and `response_key: response` for prompt/response pairs (a user turn, then
the assistant's, after an optional `system` message), `dataset:` for a hub dataset (sources.py),
`chat_template:` for a template of the recipe's own (Jinja text, or a .jinja file).

Which tokens are the assistant's: the conversation is rendered once whole, and once up to each
assistant turn with and without it (the template's prefixes); the characters in between, the
answer and its end-of-turn marker, are mapped to tokens through the fast tokenizer's offsets. Before
a conversation's first message, what the template puts ahead of it (a default system prompt, the
assistant's header) is found by rendering that message with a marker for its content, so it is
never taken for the answer. A template that does not render a conversation's beginning as a prefix
of the whole is refused. An empty (or blank) answer trains nothing, not even its end-of-turn marker.
With `max_length` or `pack`, the answers that begin past the limit are not looked for: a long
conversation costs renders up to the limit, not two per turn of the whole conversation.

The loss is then the mean over answer tokens exactly, at any number of ranks and accumulation
(launcher/data/batches.py counts labels that are not -100). A conversation cut by `max_length` so
that no answer token is left would train on nothing: such conversations are dropped, counted, and
named in a warning at the start of the run (and by `launcher check`); so are conversations with no
answer at all (no assistant turn, or only empty ones), counted apart.

`pack: N` joins consecutive conversations into samples of at most N tokens (a conversation is never
split; a longer one is cut to N). Attention is not blocked at the joins: a packed answer also sees
the conversations before it in its sample, as in TRL's packing without padding-free attention.
What it buys: fewer, fuller samples (less padding, so fewer FLOPs per answer token); what it costs:
a little cross-conversation context, and results that are not those of unpacked training. The loss
stays the exact mean over answer tokens either way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from launcher import hub
from launcher.cluster import distributed
from launcher.datasets.sources import cache_key, text_source
from launcher.errors import ArgumentError, positive
from launcher.recipe.components import require

IGNORE = -100  # a label no loss counts


class ChatData(Dataset):
    deterministic = True  # no randomness in __getitem__
    needs_padding = True  # conversations differ in length

    def __init__(
        self,
        files: str | list[str] | None = None,
        tokenizer: str | None = None,
        messages_key: str = "messages",
        prompt_key: str | None = None,
        response_key: str | None = None,
        system: str | None = None,
        chat_template: str | None = None,
        max_length: int | None = None,
        pack: int | None = None,
        cache_dir: str | None = None,
        dataset: str | None = None,
        name: str | None = None,
        split: str | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
    ) -> None:
        if tokenizer is None:
            raise ArgumentError(
                "tokenizer", "name the tokenizer: a hub id, a tokenizer directory or a tokenizer.json file"
            )
        if (prompt_key is None) != (response_key is None):
            raise ArgumentError("prompt_key", "give prompt_key and response_key together (prompt/response pairs)")
        self.max_length, self.pack = positive("max_length", max_length), positive("pack", pack)
        if max_length is not None and pack is not None:
            raise ArgumentError(
                "pack", "give max_length (cut each conversation) or pack (which cuts at pack), not both"
            )
        self.source = text_source(files, dataset, name, split, revision)
        self.tokenizer = ChatTokenizer.load(tokenizer, tokenizer_revision, chat_template)
        self.vocab_size = self.tokenizer.vocab_size  # the ids it can produce (launcher/data/fit.py)
        self.fields = (prompt_key, response_key, system) if prompt_key else (messages_key,)
        limit = self.pack or self.max_length
        key = cache_key(self.source, "chat-v3", self.tokenizer.fingerprint, self.fields, limit, pack)
        with distributed.local_main_first(key):
            self.rows, unanswered, cut, total = self._encode(key, limit, cache_dir)
        self.dropped = unanswered + cut
        # said at the start of the run and by `launcher check` (launcher/data/fit.py)
        self.notes = _drop_notes(unanswered, cut, total, limit, "pack" if pack else "max_length")
        if total and self.dropped == total:  # not "the dataset is empty": say why
            raise ArgumentError("", f"{self.source.describe()}: every conversation is dropped: {'; '.join(self.notes)}")

    def _encode(self, key: str, limit: int | None, cache_dir: str | None) -> tuple[Any, int, int, int]:
        """The encoded rows kept; how many had no answer, how many lost theirs to the limit; how many in all."""
        datasets = require("datasets", "launcher.datasets.chat.ChatData")
        raw = self.source.load(datasets, cache_dir)
        arguments = ("prompt_key", "response_key") if len(self.fields) > 1 else ("messages_key",)
        for argument, field in zip(arguments, self.fields, strict=False):
            if field not in raw.column_names:
                raise ArgumentError(
                    argument, f"{self.source.describe()} has no {field!r} field; it has {raw.column_names}"
                )
            if _mixed_json(raw.features[field]):
                # datasets reads a field whose rows mix text with numbers as JSON, and then decodes
                # text such as "3" into the number 3: the error would name a row that is right
                raise ArgumentError(
                    argument,
                    f"{self.source.describe()}: the {field!r} field holds numbers, lists or objects where text "
                    "belongs in some rows (datasets then reads all of them as JSON); make every message's "
                    "content, or every prompt and response, a string",
                )
        to_messages = _conversation(self.fields)
        encode = self.tokenizer.encode
        where = self.source.describe()

        def encode_rows(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
            # every row comes out, the dropped ones empty with the reason (counted, then filtered out)
            out: dict[str, list] = {"input_ids": [], "labels": [], DROPPED: []}
            for i, index in enumerate(indices):
                try:
                    ids, labels, answered = encode(to_messages({k: v[i] for k, v in rows.items()}), limit)
                except ArgumentError as e:
                    raise ArgumentError(e.argument, f"{where}: row {index + 1}: {e}") from None
                ids, labels = (ids[:limit], labels[:limit]) if limit else (ids, labels)
                kept = any(label != IGNORE for label in labels[1:])
                out["input_ids"].append(ids if kept else [])
                out["labels"].append(labels if kept else [])
                out[DROPPED].append(KEPT if kept else CUT if answered else UNANSWERED)
            return out

        kwargs: dict[str, Any] = {"batched": True, "batch_size": 1000, "remove_columns": raw.column_names}
        rows = raw.map(encode_rows, new_fingerprint=key, desc="formatting conversations", with_indices=True, **kwargs)
        why = rows[DROPPED]
        unanswered, cut = why.count(UNANSWERED), why.count(CUT)
        if unanswered + cut:
            rows = rows.filter(lambda d: d == KEPT, input_columns=DROPPED, new_fingerprint=f"{key}-kept")
        rows = rows.remove_columns(DROPPED)
        if self.pack:
            rows = rows.map(
                _packer(self.pack), new_fingerprint=f"{key}-packed", desc="packing", batched=True, batch_size=1000
            )
        return rows.with_format("torch"), unanswered, cut, len(raw)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    @property
    def max_sequence_length(self) -> int:
        """The longest sample (launcher/data/fit.py checks it against the model's positions)."""
        import pyarrow.compute as pc  # installed with `datasets`

        column = self.rows.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py() or 0) if len(column) else 0


DROPPED = "_dropped"  # a column of the encoding: why a conversation is left out
KEPT, UNANSWERED, CUT = 0, 1, 2  # kept; no answer at all; its answers cut off by the length


def _mixed_json(feature: Any) -> bool:
    """Does a datasets feature hold a Json value anywhere (what datasets infers for mixed types)?"""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_mixed_json(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List, Sequence, LargeList
    return inner is not None and _mixed_json(inner)


def _drop_notes(unanswered: int, cut: int, total: int, limit: int | None, limit_key: str) -> list[str]:
    notes = []
    if unanswered:
        notes.append(
            f"{unanswered} of {total} conversations have no assistant answer to train on and are dropped "
            "(no assistant turn, or empty ones)"
        )
    if cut:
        notes.append(
            f"{cut} of {total} conversations have no answer token within the first {limit} tokens "
            f"and are dropped (they would train on nothing); raise {limit_key} to keep them"
        )
    return notes


def _conversation(fields: tuple[str | None, ...]) -> Callable[[dict[str, Any]], list[dict[str, str]]]:
    """A row -> its messages: the messages field as it is, or a (system,) user, assistant exchange."""
    if len(fields) == 1:
        key = str(fields[0])
        return lambda row: row[key]
    prompt, response, system = str(fields[0]), str(fields[1]), fields[2]

    def pair(row: dict[str, Any]) -> list[dict[str, str]]:
        for argument, field in (("prompt_key", prompt), ("response_key", response)):
            if not isinstance(row[field], str):
                raise ArgumentError(argument, f"its {field!r} field is {row[field]!r}, not text")
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]

    return pair


def _packer(size: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """Consecutive conversations joined while they fit in `size` tokens (each already at most `size`)."""

    def pack(rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        ids: list[int] = []
        labels: list[int] = []
        for more_ids, more_labels in zip(rows["input_ids"], rows["labels"], strict=True):
            if ids and len(ids) + len(more_ids) > size:
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                ids, labels = [], []
            ids, labels = ids + list(more_ids), labels + list(more_labels)
        if ids:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    return pack


class ChatTokenizer:
    """A transformers fast tokenizer with a chat template: it encodes conversations with their
    answer labels, and is saved beside the exported model (hf/), template included."""

    def __init__(self, tok: Any, fingerprint: str) -> None:
        self.tok, self.fingerprint = tok, fingerprint
        self.vocab_size = len(tok)

    @classmethod
    def load(cls, spec: str, revision: str | None, chat_template: str | None) -> ChatTokenizer:
        transformers = require("transformers", "launcher.datasets.chat.ChatData")
        what = "a local tokenizer (a tokenizer.json file or a directory with one)"
        path = hub.resolve(spec, "tokenizer", what=what, revision=revision, files=hub.TOKENIZER_FILES).path
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ArgumentError("tokenizer", f"{path} is neither a tokenizer.json file nor a directory with one")
        try:
            if path.is_dir():
                tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            else:
                tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
        except Exception as e:  # a damaged tokenizer.json or config: transformers' own errors vary
            raise ArgumentError("tokenizer", f"cannot load the tokenizer in {path} ({str(e)[:120]})") from None
        if not getattr(tok, "is_fast", False):
            raise ArgumentError(
                "tokenizer", f"{path} loads as a slow tokenizer: answers are found by a fast one's offsets"
            )
        if chat_template is not None:
            template = Path(chat_template).expanduser()
            if template.suffix == ".jinja" or not any(tag in chat_template for tag in ("{{", "{%")):
                # a file's name (Jinja text always has a tag; a file of it was meant, not a constant)
                if not template.is_file():
                    raise ArgumentError(
                        "chat_template", f"{chat_template} does not exist: give a .jinja file, or the template's text"
                    )
                chat_template = template.read_text()
            tok.chat_template = chat_template
        if not getattr(tok, "chat_template", None):
            raise ArgumentError(
                "chat_template",
                f"the tokenizer {spec} has no chat template: give chat_template (Jinja text, or a .jinja file)",
            )
        digest = hashlib.sha256(file.read_bytes())
        digest.update(json.dumps(tok.chat_template).encode())
        return cls(tok, digest.hexdigest())

    def encode(self, messages: list[dict[str, str]], limit: int | None = None) -> Encoded:
        """The conversation's token ids, and labels that are the ids on the assistant's answers and -100
        elsewhere; with a `limit`, the answers past the first `limit` tokens are not looked for (their
        labels stay -100: the sample is cut there), which keeps a long conversation's cost bounded."""
        _check_messages(messages)
        text = self._render(messages)
        encoded = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # an answer beginning past the start of token `limit - 1` has no token within the limit
        reach = offsets[limit - 1][0] if limit is not None and len(ids) > limit else None
        spans: list[tuple[int, int]] = []
        beyond = False  # an answer left unlooked-for past the limit
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message["content"].strip():
                continue  # an empty answer trains nothing, not even its end-of-turn marker
            before = self._before(messages, i)
            if not text.startswith(before):
                raise _not_prefixes()
            if reach is not None and len(before) > reach:
                beyond = True  # every later answer begins later still: the prefixes are not rendered
                break
            through = self._render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)) or (spans and len(before) < spans[-1][1]):
                raise _not_prefixes()
            spans.append((len(before), len(through)))
        labels = []
        k = 0  # spans are in order and apart, as the tokens' offsets are: one pass over both
        for token, (first, last) in zip(ids, offsets, strict=True):
            while k < len(spans) and spans[k][1] < last:
                k += 1
            inside = k < len(spans) and spans[k][0] <= first and last <= spans[k][1] and last > first
            labels.append(token if inside else IGNORE)
        # the first label is never predicted (nothing comes before it)
        return Encoded(ids, labels, beyond or any(label != IGNORE for label in labels[1:]))

    def _before(self, messages: list[dict[str, str]], i: int) -> str:
        """The text the template renders before the answer of assistant message i: the conversation
        before it with the generation prompt; before a first message, what the template puts ahead of
        any conversation (a default system prompt, the assistant's header), found by rendering the
        message with a marker for its content."""
        if i:
            return self._render(messages[:i], add_generation_prompt=True)
        probe = self._render([{**messages[0], "content": MARKER}])
        if probe.count(MARKER) != 1:
            raise _not_prefixes()
        return probe[: probe.index(MARKER)]

    def _render(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        try:
            return str(self.tok.apply_chat_template(messages, tokenize=False, **kwargs))
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):  # the template's raise_exception, or its own mistake
                raise ArgumentError(
                    "chat_template",
                    f"the chat template refuses the conversation ({type(e).__name__}: {str(e)[:160]}); "
                    "fix the row, or give a chat_template that accepts it",
                ) from None
            raise

    def save_into(self, directory: Path) -> None:
        """Beside a save_pretrained model: AutoTokenizer.from_pretrained(directory) gives this
        tokenizer, its chat template included."""
        self.tok.save_pretrained(directory)


class Encoded(NamedTuple):
    ids: list[int]
    labels: list[int]
    answered: bool  # a label to train on (before any cut): else the conversation has no answer


MARKER = "LAUNCHERANSWER7c1e9b"  # stands for a first answer's content, to find where the template puts it


def _not_prefixes() -> ArgumentError:
    return ArgumentError(
        "chat_template",
        "the chat template does not render a conversation's first turns as the beginning of the whole "
        "conversation, so the answers cannot be found; give a chat_template that does",
    )


def _check_messages(messages: Any) -> None:
    if isinstance(messages, list) and not messages:
        raise ArgumentError("messages_key", "the conversation is empty (no messages)")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ArgumentError(
            "messages_key",
            f"a conversation must be a list of {{role, content}} messages with text; got {str(messages)[:80]}",
        )
