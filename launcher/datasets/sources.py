"""Where a text dataset's rows come from: local files (`files:`), or a dataset (`dataset:`) named by
hub id, fetched once per node into the hub's cache (launcher/hub.py), or by a local directory. Both
are read by Hugging Face `datasets`, map-style or streamed.

    files: data/train.jsonl                 # local JSON lines, Parquet or text files
    dataset: HuggingFaceH4/no_robots        # or a hub dataset (or a local dataset directory) ...
    name: default                           # ... its configuration, if it has several
    split: train                            # ... the split ("train" by default)
    revision: main                          # ... a branch, tag or commit of the hub id
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import hub
from launcher.datasets.documents import data_files, first_bad_row
from launcher.errors import ArgumentError


@dataclass(frozen=True)
class LocalFiles:
    paths: list[Path]
    format: str  # the `datasets` builder: json, parquet or text

    def identity(self) -> list[Any]:
        """What the tokenization cache is keyed by: the files' names, sizes and modification times."""
        return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.paths]

    def load(self, datasets: Any, cache_dir: str | None, streaming: bool = False) -> Any:
        files = [str(p) for p in self.paths]
        if not streaming:  # the Arrow files datasets makes of them
            hub.writable_cache("datasets", f"reading {self.describe()}", cache_dir)
        return datasets.load_dataset(
            self.format, data_files=files, split="train", cache_dir=cache_dir, streaming=streaming
        )

    def bad_row(self, text_key: str) -> ArgumentError | None:
        """datasets' parse errors name neither file nor line: found by reading the files ourselves."""
        return first_bad_row(self.paths, text_key)

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)


@dataclass(frozen=True)
class NamedDataset:
    source: hub.Source  # a snapshot in the hub's cache (its directory name is the commit), or a local directory
    name: str | None
    split: str
    remote: bool = False  # streamed from the hub at source.commit (only its card is in the cache)

    def identity(self) -> list[Any]:
        """The snapshot's commit (in its path), configuration and split; a local directory's files."""
        if self.remote:
            return [self.source.hub_id, self.source.commit, self.name, self.split]
        if self.source.hub_id is not None:
            return [str(self.source.path), self.name, self.split]
        files = sorted(p for p in self.source.path.rglob("*") if p.is_file())
        return [self.name, self.split, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]

    def load(self, datasets: Any, cache_dir: str | None, streaming: bool = False) -> Any:
        where: dict[str, Any] = {"path": str(self.source.path)}
        if self.remote:  # every rank reads the hub's files at the commit resolved once
            where = {"path": self.source.hub_id, "revision": self.source.commit}
        elif not streaming:  # the Arrow files datasets makes of it
            hub.writable_cache("datasets", f"reading {self.describe()}", cache_dir)
        try:
            return datasets.load_dataset(
                **where, name=self.name, split=self.split, cache_dir=cache_dir, streaming=streaming or self.remote
            )
        except ValueError as e:  # an unknown split or configuration: datasets lists the ones it has
            first = str(e).strip().splitlines()[0]
            key = "split" if "split" in first.lower() else "name"
            raise ArgumentError(key, f"{self.describe()}: {first}") from None

    def bad_row(self, text_key: str) -> ArgumentError | None:  # noqa: ARG002  # LocalFiles' signature
        return None  # datasets' own error is all there is

    def describe(self) -> str:
        what = self.source.hub_id or str(self.source.path)
        return f"{what}{f' ({self.name})' if self.name else ''} split {self.split}"


# what a dataset streamed from the hub fetches: its card, for the commit; never its data (a
# pretraining corpus may be terabytes, read as it trains)
DATASET_CARD = ("README.md",)


def text_source(
    files: str | list[str] | None,
    dataset: str | None,
    name: str | None,
    split: str | None,
    revision: str | None,
    streaming: bool = False,
) -> LocalFiles | NamedDataset:
    """`files` or `dataset` (with its `name`, `split` and `revision`), exactly one. `streaming`: a
    hub id is read from the hub as the run goes, where the hub can be reached; offline, from the
    snapshot in the cache."""
    if (files is None) == (dataset is None):
        raise ArgumentError("files", "give files (local data files) or dataset (a hub id or dataset directory), one")
    if dataset is None:
        for key, value in (("name", name), ("split", split), ("revision", revision)):
            if value is not None:
                raise ArgumentError(key, f"{key} belongs to a dataset (a hub id); files are read whole")
        assert files is not None
        paths, fmt = data_files(files)
        return LocalFiles(paths, fmt)
    what = "a local dataset directory"
    if streaming and not hub.offline("dataset") and not Path(dataset).expanduser().exists():
        card = hub.resolve(dataset, "dataset", what=what, repo_type="dataset", revision=revision, files=DATASET_CARD)
        return NamedDataset(card, name, split or "train", remote=True)
    return NamedDataset(
        hub.resolve(dataset, "dataset", what=what, repo_type="dataset", revision=revision), name, split or "train"
    )


def cache_key(source: LocalFiles | NamedDataset, *args: Any) -> str:
    """A tokenization's key in datasets' cache: the source's identity and everything that shapes the rows."""
    return hashlib.sha256(json.dumps([source.identity(), *args], default=str).encode()).hexdigest()[:32]
