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
`chat_template:` for a template of the recipe's own (Jinja text, or a .jinja file). Rows are read
as conversations.py says: OpenAI's `weight`, ShareGPT's `{from, value}`, keys a template may use;
local JSON files line by line, so that a row at fault is named by file, line, row and message.

Which tokens are the assistant's (chat_tokenizer.py): a template with `{% generation %}` markers
says so itself, as TRL takes it. Any other is read by its prefixes: the conversation is rendered
once whole, and once up to each assistant turn with and without it; the characters in between, the
answer and its end-of-turn marker, are mapped to tokens through the fast tokenizer's offsets. Before
a conversation's first message, what the template puts ahead of it (a default system prompt, the
assistant's header) is found by rendering that message with a marker for its content, so it is
never taken for the answer. A template that does not render a conversation's beginning as a prefix
of the whole is refused. An empty (or blank) answer, or one of weight 0, trains nothing, not even
its end-of-turn marker.
With `max_length` or `pack`, the answers that begin past the limit are not looked for: a long
conversation costs renders up to the limit, not two per turn of the whole conversation.

The loss is then the mean over answer tokens exactly, at any number of ranks and accumulation
(launcher/data/batches.py counts labels that are not -100). A conversation cut by `max_length` so
that no answer token is left would train on nothing: such conversations are dropped, counted, and
named in a warning at the start of the run (and by `launcher check`); so are conversations with no
answer at all (no assistant turn, or only empty ones), counted apart.

`pack: N` joins consecutive conversations into samples of at most N tokens (a conversation is never
split; a longer one is cut to N). Each conversation's tokens attend only to its own (packing.py):
its position ids restart at 0, so a packed sample trains exactly as its conversations would
unpacked, with less padding (fewer FLOPs per answer token). `pack_attention: cross` lets attention
cross the joins instead, as before (TRL's packing without padding-free attention): a packed answer
then also sees the conversations before it in its sample, and results differ from unpacked training.
The loss stays the exact mean over answer tokens either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from launcher.cluster import distributed
from launcher.datasets.chat_tokenizer import IGNORE, ChatTokenizer
from launcher.datasets.conversations import Place, ambiguous, read_local_json, row_reader
from launcher.datasets.packing import DOCUMENT, POSITION_IDS, attention, packer
from launcher.datasets.sources import LocalFiles, cache_key, text_source
from launcher.errors import ArgumentError, positive
from launcher.recipe.components import require


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
        pack_attention: str = DOCUMENT,
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
        self.documents = attention(pack_attention, pack)  # packed with position ids that restart
        self.source = text_source(files, dataset, name, split, revision)
        self.tokenizer = ChatTokenizer.load(tokenizer, tokenizer_revision, chat_template)
        self.vocab_size = self.tokenizer.vocab_size  # the ids it can produce (launcher/data/fit.py)
        self.fields = (prompt_key, response_key, system) if prompt_key else (messages_key,)
        limit = self.pack or self.max_length
        key = cache_key(self.source, "chat-v4", self.tokenizer.fingerprint, self.fields, limit, pack, self.documents)
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
        source = self.source
        if isinstance(source, LocalFiles) and source.format == "json":
            raw = read_local_json(datasets, source.paths, source.identity(), cache_dir)
            place = Place(source.describe(), source.paths)
        else:
            raw, place = self._load(datasets, cache_dir), Place(source.describe())
        to_messages = row_reader(self.fields)
        encode = self.tokenizer.encode

        def encode_rows(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
            # every row comes out, the dropped ones empty with the reason (counted, then filtered out)
            out: dict[str, list] = {"input_ids": [], "labels": [], DROPPED: []}
            for i, index in enumerate(indices):
                row = {k: v[i] for k, v in rows.items()}
                try:
                    ids, labels, answered = encode(to_messages(row), limit)
                except ArgumentError as e:
                    raise ArgumentError(e.argument, f"{place.of(index, row)}: {e}") from None
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
                packer(self.pack, self.documents),
                new_fingerprint=f"{key}-packed",
                desc="packing",
                batched=True,
                batch_size=1000,
            )
        return rows.with_format("torch"), unanswered, cut, len(raw)

    def _load(self, datasets: Any, cache_dir: str | None) -> Any:
        """A hub dataset, a dataset directory or Parquet files, through `datasets`, its fields checked."""
        try:
            raw = self.source.load(datasets, cache_dir)
        except ArgumentError:
            raise
        except Exception as e:  # datasets' own errors name no row
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            argument = "files" if isinstance(self.source, LocalFiles) else "dataset"
            raise ArgumentError(
                argument, f"cannot read {self.source.describe()}: {type(e).__name__}: {first}"
            ) from None
        arguments = ("prompt_key", "response_key") if len(self.fields) > 1 else ("messages_key",)
        for argument, field in zip(arguments, self.fields, strict=False):
            if field not in raw.column_names:
                raise ArgumentError(
                    argument, f"{self.source.describe()} has no {field!r} field; it has {raw.column_names}"
                )
            if ambiguous(raw.features[field], whole=len(self.fields) > 1):
                # datasets reads a field whose rows mix text with numbers as JSON, and then decodes
                # text such as "3" into the number 3: the error would name a row that is right
                raise ArgumentError(
                    argument,
                    f"{self.source.describe()}: the {field!r} field holds numbers, lists or objects where text "
                    "belongs in some rows (datasets then reads all of them as JSON); make every message's "
                    "role and content, or every prompt and response, a string",
                )
        return raw

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {k: row[k] for k in ("input_ids", "labels", POSITION_IDS) if k in row}

    @property
    def max_sequence_length(self) -> int:
        """The longest sample (launcher/data/fit.py checks it against the model's positions)."""
        import pyarrow.compute as pc  # installed with `datasets`

        column = self.rows.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py() or 0) if len(column) else 0


DROPPED = "_dropped"  # a column of the encoding: why a conversation is left out
KEPT, UNANSWERED, CUT = 0, 1, 2  # kept; no answer at all; its answers cut off by the length


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
