"""Conversations as people have them, read for ChatData (chat.py): rows of local JSON files read
here, line by line, so that a broken line, or a message without `content`, is one line naming the
file, the row and the message; every row of any source made into the messages a chat template reads.

What a message may hold: `role` and text `content` (ShareGPT's `from` and `value` are read as
those, `human` and `gpt` as `user` and `assistant`); OpenAI's fine-tuning `weight` (0 or 1) on an
assistant message, 0 meaning it is context and not trained on; any other key (`name`, `tool_calls`,
a thinking template's `reasoning_content`) is passed to the template, which uses it or not.

Why local JSON is not read by `datasets`' JSON loader: it infers one schema from the first 10 MB
and fails on a later row whose messages have other keys (a `weight` first met on row 50,000), and
where messages differ in their keys within that first block it reads them as JSON values, which
are right, but a field whose text is sometimes a number comes back with "3" turned into 3.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from launcher.datasets.documents import generated, json_records
from launcher.errors import ArgumentError

ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's role names
# an assistant message holding one of these has an answer even with empty content
ANSWER_KEYS = ("tool_calls", "reasoning_content", "reasoning", "thinking")

# the columns of local JSON rows as read here: which file, its line (0 in a JSON array file), the row's text
FILE, LINE, TEXT = "_file", "_line", "_json"


def read_local_json(datasets: Any, paths: list[Path], identity: list[Any], cache_dir: str | None) -> Any:
    """A `datasets.Dataset` of the files' rows, one JSON text each with its file and line."""
    features = datasets.Features(
        {FILE: datasets.Value("int32"), LINE: datasets.Value("int64"), TEXT: datasets.Value("string")}
    )
    # the identity (names, sizes, modification times) is in gen_kwargs so that an edited file is read anew
    kwargs = {"files": json.dumps([str(p) for p in paths]), "identity": json.dumps(identity)}
    return generated(datasets, _rows, features, cache_dir, kwargs, paths)


def _rows(files: str, identity: str) -> Iterator[dict[str, Any]]:  # noqa: ARG001  # identity: the cache's key
    for index, path in enumerate(json.loads(files)):
        for line, text in json_records(Path(path)):
            yield {FILE: index, LINE: line, TEXT: text}


class Place:
    """Where a row is, for an error: `file:line: row N` for JSON lines, `file: row N` otherwise."""

    def __init__(self, describe: str, paths: list[Path] | None = None) -> None:
        self.describe, self.paths = describe, paths
        self.rows_before: dict[int, int] = {}

    def of(self, index: int, row: dict[str, Any] | None = None) -> str:
        if row is None or self.paths is None or FILE not in row:
            return f"{self.describe}: row {index + 1}"
        path, line = self.paths[row[FILE]], row[LINE]
        where = f"{path}:{line}" if line else str(path)
        return f"{where}: row {index + 1 - self._first_row(row[FILE])}"

    def _first_row(self, file: int) -> int:
        """How many rows come before this file's (only asked when an error is said)."""
        if file not in self.rows_before:
            self.rows_before[file] = sum(sum(1 for _ in json_records(p)) for p in (self.paths or [])[:file])
        return self.rows_before[file]


def parsed(row: dict[str, Any]) -> dict[str, Any]:
    """A row read here (its JSON text) as its fields; a row from `datasets` as it is."""
    if TEXT not in row:
        return row
    try:
        value = json.loads(row[TEXT])
    except json.JSONDecodeError as e:
        raise ArgumentError("files", f"not valid JSON lines ({e.msg}); fix or remove that line") from None
    if not isinstance(value, dict):
        raise ArgumentError(
            "files", f"a row must be a JSON object with the conversation's fields; got {row[TEXT][:60]}"
        )
    return value


def row_reader(fields: tuple[str | None, ...]) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """A row -> its messages: the messages field, or a (system,) user, assistant exchange from a
    prompt/response pair."""
    if len(fields) == 1:
        key = str(fields[0])

        def conversation(row: dict[str, Any]) -> list[dict[str, Any]]:
            row = parsed(row)
            if key not in row:
                hint = "; set messages_key: conversations (ShareGPT's layout)" if "conversations" in row else ""
                raise ArgumentError("messages_key", f"no {key!r} field (the row has {sorted(row)}){hint}")
            return messages_of(row[key])

        return conversation
    prompt, response, system = str(fields[0]), str(fields[1]), fields[2]

    def pair(row: dict[str, Any]) -> list[dict[str, Any]]:
        row = parsed(row)
        for argument, field in (("prompt_key", prompt), ("response_key", response)):
            if field not in row:
                raise ArgumentError(argument, f"no {field!r} field (the row has {sorted(row)})")
            if not isinstance(row[field], str):
                raise ArgumentError(argument, f"its {field!r} field is {row[field]!r}, not text")
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]

    return pair


def messages_of(value: Any) -> list[dict[str, Any]]:
    """The conversation's messages, checked, each a new dict: ShareGPT's keys and roles read as
    role and content, keys whose value is null left out (a Parquet file or `datasets` gives every
    message every key some message has)."""
    if not isinstance(value, list):
        raise ArgumentError(
            "messages_key", f"a conversation must be a list of {{role, content}} messages; got {str(value)[:80]}"
        )
    if not value:
        raise ArgumentError("messages_key", "the conversation is empty (no messages)")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ArgumentError("messages_key", f"message {i + 1} is {str(m)[:60]}, not a {{role, content}} object")
    m = {k: v for k, v in m.items() if v is not None}
    if "role" not in m and "from" in m:  # ShareGPT
        source = m.pop("from")
        m["role"] = ROLES.get(source, source) if isinstance(source, str) else source
    if "content" not in m and "value" in m:
        m["content"] = m.pop("value")
    role = m.get("role")
    which = f"message {i + 1}" + (f" ({role})" if isinstance(role, str) else "")
    if not isinstance(role, str):
        raise ArgumentError("messages_key", f"{which} has no text 'role' (it has {sorted(m)})")
    if "content" not in m:
        raise ArgumentError(
            "messages_key", f"{which} has no 'content' (it has {sorted(m)}); give it one (\"\" for none)"
        )
    if not isinstance(m["content"], str):
        raise ArgumentError("messages_key", f"{which}: its content is {str(m['content'])[:60]}, not text")
    weight = m.get("weight", 1)
    if isinstance(weight, (bool, str)) or weight not in (0, 1):
        raise ArgumentError("messages_key", f"{which}: its weight is {weight!r}; give 0 (not trained on) or 1")
    if weight == 1 and "weight" in m and role != "assistant":
        raise ArgumentError("messages_key", f"{which}: weight 1 trains assistant messages only; give 0 or none")
    return m


def trained(message: dict[str, Any]) -> bool:
    """Is this message an answer to train on: an assistant's, not weight 0, with something in it
    (an empty or blank one trains nothing, not even its end-of-turn marker)?"""
    if message["role"] != "assistant" or message.get("weight", 1) == 0:
        return False
    return bool(message["content"].strip()) or any(message.get(k) for k in ANSWER_KEYS)


def ambiguous(feature: Any, whole: bool) -> bool:
    """Does a `datasets` feature hold text that may have been read as a number: a JSON value where
    text belongs (what datasets infers for a field mixing types; it gives "3" back as 3)? `whole`:
    the field is text itself (a prompt or response); else it holds messages, and a message read
    whole as JSON is right (its text is quoted in it), its role or content read alone is not."""
    if whole:
        return _is_json(feature)
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    return isinstance(inner, dict) and any(_is_json(inner.get(k)) for k in ("role", "content", "from", "value"))


def _is_json(feature: Any) -> bool:
    return type(feature).__name__ == "Json"
