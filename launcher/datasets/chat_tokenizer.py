"""Which tokens of a conversation are the assistant's answers, for ChatData (chat.py): a transformers
fast tokenizer with a chat template, loaded from a hub id, a directory or a tokenizer.json file.

A template with `{% generation %}` markers around the answers (TRL's training templates, for
models whose own template the prefix rule below refuses) says itself which tokens are answers:
those transformers' `return_assistant_tokens_mask` marks, exactly as TRL's `assistant_only_loss`
takes them. Any other template is read by its prefixes: the conversation is rendered once whole,
and once up to each answer with and without it; the characters in between are the answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from launcher import hub
from launcher.datasets.conversations import messages_of, trained
from launcher.errors import ArgumentError
from launcher.recipe.components import require

IGNORE = -100  # a label no loss counts


class ChatTokenizer:
    """A transformers fast tokenizer with a chat template: it encodes conversations with their
    answer labels, and is saved beside the exported model (hf/), template included."""

    def __init__(self, tok: Any, fingerprint: str) -> None:
        self.tok, self.fingerprint = tok, fingerprint
        self.vocab_size = len(tok)
        self.marked = has_generation_markers(tok.chat_template)  # its answers are the blocks it marks

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

    def encode(self, messages: list[dict[str, Any]], limit: int | None = None) -> Encoded:
        """The conversation's token ids, and labels that are the ids on the assistant's answers and -100
        elsewhere; with a `limit`, the answers past the first `limit` tokens are not looked for (their
        labels stay -100: the sample is cut there), which keeps a long conversation's cost bounded.
        A template with `{% generation %}` markers says itself which tokens are answers."""
        messages = messages_of(messages)
        answers = [trained(m) for m in messages]
        # the weight is the launcher's (OpenAI's), not the template's to render
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        if self.marked:
            return self._encode_marked(messages, answers)
        text = self._render(messages)
        encoded = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # an answer beginning past the start of token `limit - 1` has no token within the limit
        reach = offsets[limit - 1][0] if limit is not None and len(ids) > limit else None
        spans: list[tuple[int, int]] = []
        beyond = False  # an answer left unlooked-for past the limit
        for i in range(len(messages)):
            if not answers[i]:
                continue  # not an answer, weight 0, or empty: trains nothing, not even its end-of-turn marker
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

    def _encode_marked(self, messages: list[dict[str, Any]], answers: list[bool]) -> Encoded:
        """Labels from the template's `{% generation %}` blocks, as TRL's assistant_only_loss takes
        them (transformers' return_assistant_tokens_mask: every token overlapping a block); the
        blocks of assistant messages with weight 0, or empty, are not labelled."""
        ids, mask = self._masked(messages)
        runs = _runs(mask)
        skipped = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not answers[i]]
        if skipped and runs:
            owners = self._owners(messages, len(runs))
            for (start, end), owner in zip(runs, owners, strict=True):
                if owner in skipped:
                    mask[start:end] = [0] * (end - start)
        labels = [token if marked else IGNORE for token, marked in zip(ids, mask, strict=True)]
        return Encoded(ids, labels, any(label != IGNORE for label in labels[1:]))

    def _masked(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        out = self._apply(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])

    def _owners(self, messages: list[dict[str, Any]], count: int) -> list[int]:
        """Which message each run of marked tokens belongs to: found by rendering the conversation
        with a marker for each assistant message's content; a run with no marker (an end-of-text
        block after the last answer) belongs to the run before it."""
        probe = [{**m, "content": f"{MARKER}-{i}-"} if m["role"] == "assistant" else m for i, m in enumerate(messages)]
        text = self._render(probe)
        ids, mask = self._masked(probe)
        offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        runs = _runs(mask)
        owners: list[int] = []
        for start, end in runs if len(offsets) == len(ids) else []:
            inside = text[offsets[start][0] : offsets[end - 1][1]]
            found = [i for i, m in enumerate(messages) if m["role"] == "assistant" and f"{MARKER}-{i}-" in inside]
            if len(found) > 1 or not (found or owners):
                break
            owners.append(found[0] if found else owners[-1])
        if len(owners) != count or len(runs) != count:
            raise ArgumentError(
                "chat_template",
                "the chat template's {% generation %} blocks cannot be told apart by message, so an assistant "
                "message with weight 0 (or an empty one) cannot be left out of the labels; remove its weight, "
                "or give a chat_template with one block per assistant message",
            )
        return owners

    def _before(self, messages: list[dict[str, Any]], i: int) -> str:
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

    def _render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return str(self._apply(messages, tokenize=False, **kwargs))

    def _apply(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        try:
            return self.tok.apply_chat_template(messages, **kwargs)
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


MARKER = "LAUNCHERANSWER7c1e9b"  # stands for an answer's content, to find where the template puts it


def _not_prefixes() -> ArgumentError:
    return ArgumentError(
        "chat_template",
        "the chat template does not render a conversation's first turns as the beginning of the whole "
        "conversation, so the answers cannot be found; give a chat_template that does, or one with "
        "{% generation %} markers around the answers (TRL ships such training variants of Phi-3, DeepSeek, "
        "gpt-oss, Nemotron and others in trl/chat_templates)",
    )


def has_generation_markers(template: Any) -> bool:
    """Does the template mark its answers with `{% generation %}` (as TRL checks it)?"""
    if isinstance(template, dict):  # named variants: the default one is used
        template = template.get("default", "")
    return isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """The [start, end) ranges of consecutive marked tokens."""
    runs: list[tuple[int, int]] = []
    for i, marked in enumerate(mask):
        if marked and runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        elif marked:
            runs.append((i, i + 1))
    return runs
