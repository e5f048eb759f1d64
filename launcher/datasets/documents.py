"""Local text documents, read one way everywhere: `launcher tokenize`, StreamedText, TokenizedText's
JSON lines, and the search for the bad row when `datasets` fails in TokenizedText.

Formats go by suffix: .jsonl and .json are JSON lines (a `text_key` field per line; a file holding
one JSON array is read as its elements, as `datasets` reads it), .parquet a `text_key` column,
.txt a document per non-blank line (or, `whole_files`, one per file). A bad row
is one line naming the file and the line (or Parquet row): broken JSON, a missing, null or non-text
field, bytes that are not UTF-8. An empty file is named too. Blank lines are no documents, in every
format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from launcher.errors import ArgumentError, MissingFile

# suffix -> the `datasets` builder that reads it
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def data_files(files: str | list[str], key: str = "files", one_format: bool = True) -> tuple[list[Path], str]:
    """The files, checked to exist, to be non-empty and (`one_format`: as `datasets` reads them in
    one go) to share one format: (paths, builder name; "" for several)."""
    paths = [Path(f).expanduser() for f in ([files] if isinstance(files, str) else files)]
    for path in paths:
        if not path.is_file():
            raise MissingFile(key, f"{path} does not exist; name local data files")
    formats = {FORMATS.get(p.suffix) for p in paths}
    if None in formats or (one_format and len(formats) != 1):
        what = "all .jsonl/.json, all .parquet or all .txt" if one_format else ".jsonl/.json, .parquet or .txt"
        raise ArgumentError(key, f"expected files {what}; got {[p.name for p in paths]}")
    for path in paths:
        if path.stat().st_size == 0:
            raise ArgumentError(key, f"{path} is empty: it holds no document; remove it from {key} or fill it")
    return paths, (formats.pop() or "") if len(formats) == 1 else ""


def documents(paths: list[Path], text_key: str, whole_files: bool = False) -> Iterator[str]:
    """Every document's text, in file order, checked row by row (ArgumentError for `files` or
    `text_key`, naming the file and line)."""
    for path in paths:
        fmt = FORMATS[path.suffix]
        if fmt == "parquet":
            yield from _parquet(path, text_key)
        elif fmt == "text" and whole_files:
            yield _decoded(path, path.read_bytes(), 0)
        elif fmt == "json":
            for row, (number, text) in enumerate(json_records(path), 1):
                yield _field(path, str(number) if number else f"row {row}", text, text_key)
        else:
            for _, text in _lines(path):
                yield text


def batched(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    """`docs` in lists of `size` (tokenizers work on batches). A bad row ends the stream after the
    documents read before it, as their own last batch: what stands before it is still used."""
    batch: list[str] = []
    try:
        for doc in docs:
            batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
    except ArgumentError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def first_bad_row(paths: list[Path], text_key: str) -> ArgumentError | None:
    """The first row `documents` refuses, as its error (None: every row reads)."""
    try:
        for _ in documents(paths, text_key):
            pass
    except ArgumentError as e:
        return e
    return None


def json_texts(datasets: Any, paths: list[Path], text_key: str, identity: list[Any], cache_dir: str | None) -> Any:
    """JSON lines files' `text_key` fields as a `datasets.Dataset` of that one column, read here and
    not by datasets' JSON loader: it infers one schema from a file's first 10 MB and fails on a later
    row whose other fields differ (a `meta` object with other keys), though the text is all we read."""
    features = datasets.Features({text_key: datasets.Value("string")})
    files = json.dumps([str(p) for p in paths])
    # the identity (names, sizes, modification times) keys the cache: an edited file is read anew
    kwargs = {"files": files, "text_key": text_key, "identity": json.dumps(identity)}
    return generated(datasets, _json_texts, features, cache_dir, kwargs, paths)


def _json_texts(files: str, text_key: str, identity: str) -> Iterator[dict[str, str]]:  # noqa: ARG001  # the key
    for text in documents([Path(p) for p in json.loads(files)], text_key):
        yield {text_key: text}


def generated(
    datasets: Any, generator: Callable, features: Any, cache_dir: str | None, kwargs: dict, paths: list[Path]
) -> Any:
    """`datasets.Dataset.from_generator`, cached by the generator and its arguments; an ArgumentError
    the generator raises (a bad row, named) is given back as it is, not as datasets' wrapper. The
    cache it writes into (`paths`' Arrow files) must be writable: else one line naming its variable."""
    from launcher import hub

    hub.writable_cache("datasets", f"reading {', '.join(str(p) for p in paths[:3])}", cache_dir)
    try:
        return datasets.Dataset.from_generator(generator, features=features, cache_dir=cache_dir, gen_kwargs=kwargs)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ArgumentError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def json_records(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, JSON text) of each record of a JSON lines file, unparsed; a file holding one
    JSON array (as `datasets` also reads a .json file) gives its elements, each with line 0."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        text = _decoded(path, path.read_bytes(), 0)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgumentError("files", f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix that line") from None
        if isinstance(records, list):
            for record in records:
                yield 0, json.dumps(record)
            return
    yield from _lines(path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line, decoded as UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            text = _decoded(path, raw, number).rstrip("\r\n")
            if text.strip():
                yield number, text


def _decoded(path: Path, raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{number}" if number else str(path)
        raise ArgumentError(
            "files",
            f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); re-encode the file as UTF-8",
        ) from None


def _field(path: Path, where: str, line: str, text_key: str) -> str:
    """A JSON record's text field; `where`: its line number, or `row N` in a JSON array file."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ArgumentError(
            "files", f"{path}:{where}: not valid JSON lines ({e.msg}); fix or remove that line"
        ) from None
    if not isinstance(row, dict) or text_key not in row:
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ArgumentError("text_key", f"{path}:{where}: no {text_key!r} field (the line has {have})")
    return _text(path, where, row[text_key], text_key)


def _text(path: Path, where: str, value: Any, text_key: str) -> str:
    if not isinstance(value, str):
        raise ArgumentError("files", f"{path}:{where}: {text_key!r} is {value!r}, not text; fix or remove that row")
    return value


def _parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # installed with `datasets`

    table = pq.ParquetFile(path)
    if text_key not in table.schema_arrow.names:
        raise ArgumentError("text_key", f"{path} has no {text_key!r} column; it has {table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(columns=[text_key]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text(path, f"row {row}", value, text_key)
