"""Hugging Face hub ids for models, tokenizers and datasets: a name that is not a local path is
fetched from the hub into its cache (HF_HUB_CACHE, ~/.cache/huggingface/hub), once per node.

Local rank 0 of each node downloads first while the node's other ranks wait, then every rank reads
the cached snapshot (`distributed.local_main_first`). huggingface_hub does the work and its rules
hold: HF_HUB_OFFLINE=1 reads the cache only (HF_DATASETS_OFFLINE=1 too, for datasets); a token
comes from HF_TOKEN or `hf auth login` and the launcher never reads, logs or writes it. Offline with
nothing cached, an unknown id, a gated repo or a missing revision is one line naming the key and the id.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.cluster import distributed
from launcher.errors import ArgumentError, LaunchError
from launcher.recipe.components import require

# what a model needs (weights as safetensors, config, tokenizer, chat template); never code
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
CONFIG_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")  # `launcher check`: no weights
TOKENIZER_FILES = CONFIG_FILES

# owner/name, or a bare name (the hub's old canonical repos, like gpt2): letters, digits, -, _, .
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class Source:
    """Where a named model, tokenizer or dataset was found."""

    path: Path  # a local file or directory: the user's, or a snapshot in the hub's cache
    hub_id: str | None  # None for a local path
    commit: str | None  # the snapshot's commit (its directory name in the cache)

    def describe(self) -> str:
        if self.hub_id is None:
            return f"local {self.path}"
        return f"{self.hub_id} at commit {(self.commit or '?')[:12]}, cached in {self.path}"


# what this process fetched from the hub, by id: `launcher check` prints where each came from
resolved: dict[str, Source] = {}


def is_hub_id(spec: str) -> bool:
    """Could `spec` name a hub repository? (A path that exists is always taken as a path.)"""
    return bool(_HUB_ID.match(spec)) and not spec.startswith(".") and ".." not in spec


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline(repo_type: str = "model") -> bool:
    """Is the hub off for this kind of repository? HF_HUB_OFFLINE for all; HF_DATASETS_OFFLINE for
    datasets too (huggingface_hub itself reads only the first)."""
    return _flag("HF_HUB_OFFLINE") or (repo_type == "dataset" and _flag("HF_DATASETS_OFFLINE"))


def resolve(
    spec: str,
    argument: str,
    *,
    what: str,
    repo_type: str = "model",
    revision: str | None = None,
    files: Sequence[str] | None = None,
) -> Source:
    """A local path as it is, or a hub id's snapshot directory (the `files` patterns downloaded, or
    all files); ArgumentError for the component's `argument` otherwise. `what` says what a local path should be."""
    # a tokenizer's revision is its own argument beside a dataset's (ChatData, TokenizedText)
    revision_key = "tokenizer_revision" if argument == "tokenizer" else "revision"
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise ArgumentError(revision_key, f"{spec} is a local path: a revision names a commit of a hub id only")
        return Source(path, None, None)
    if not is_hub_id(spec):
        raise ArgumentError(argument, f"{spec} does not exist: name {what}, or a hub id (org/name)")
    hub = require("huggingface_hub", f"the hub id {spec}")
    if not offline(repo_type):  # online it downloads into the cache; offline it only reads
        writable_cache("hub", f"the hub id {spec}")
    with distributed.local_main_first(f"hub/{repo_type}/{spec}/{revision}/{','.join(files or ['*'])}"):
        try:
            folder = hub.snapshot_download(
                repo_id=spec,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=list(files) if files else None,
                local_files_only=offline(repo_type),
            )
        except Exception as e:
            raise _hub_error(spec, argument, what, repo_type, revision, e, revision_key) from None
    source = Source(Path(folder), spec, Path(folder).name)
    resolved[spec] = source
    return source


def _hub_error(
    spec: str, name: str, what: str, repo_type: str, revision: str | None, e: Exception, revision_key: str
) -> ArgumentError:
    """huggingface_hub's errors, as one line that says what to do; the token is never in them."""
    kind = type(e).__name__
    at = f" at revision {revision}" if revision else ""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    download = f"`hf download {spec}{flag}{f' --revision {revision}' if revision else ''}`"
    if kind == "RevisionNotFoundError":
        return ArgumentError(revision_key, f"{spec} has no revision {revision!r}: name a branch, tag or commit it has")
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or "401" in str(e).split("\n")[0]:
        return ArgumentError(
            name,
            f"{spec} is neither {what} nor a {repo_type} repository on the hub that this machine may read "
            "(unknown, private or gated): check the name, or log in (`hf auth login`, or HF_TOKEN) "
            "with an account that has access",
        )
    if kind in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled"):
        where = f"the hub is off ({_off_flag(repo_type)})" if offline(repo_type) else "the hub cannot be reached"
        return ArgumentError(
            name,
            f"{spec}{at} is neither {what} nor in the Hugging Face cache ({_cache_dir()}), and {where}: "
            f"download it once with {download} where the hub can be reached (the same cache), or run once online",
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ArgumentError(name, f"fetching {spec}{at} from the hub failed: {kind}: {first}")


def lacks(source: Source, argument: str, files: str) -> ArgumentError:
    """A hub snapshot without the `files` a run needs (weights, say): offline, the cache holds only part
    of the repository (`launcher check` fetched its config alone), and the fix is to download the rest;
    online, the repository itself lacks them."""
    if offline():
        return ArgumentError(
            argument,
            f"{source.hub_id} is only partly in the Hugging Face cache ({source.path} has no {files}), and the hub "
            f"is off ({_off_flag('model')}): download it once with `hf download {source.hub_id}` where the hub can "
            "be reached (the same cache), or run once online",
        )
    return ArgumentError(argument, f"{source.hub_id} at commit {(source.commit or '?')[:12]} has no {files}")


def _off_flag(repo_type: str) -> str:
    return "HF_DATASETS_OFFLINE=1" if repo_type == "dataset" and not _flag("HF_HUB_OFFLINE") else "HF_HUB_OFFLINE=1"


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with the [hf] extra
        return "~/.cache/huggingface/hub"


# the variables that place each cache, most specific first; HF_HOME holds both by default
_CACHE_VARIABLES = {
    "hub": ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"),
    "datasets": ("HF_DATASETS_CACHE", "HF_HOME"),
}


def writable_cache(cache: str, needed_by: str, cache_dir: str | None = None) -> None:
    """The Hugging Face cache that `needed_by` writes into (`cache`: "hub", for downloads, or
    "datasets", for the Arrow files datasets makes) must be a directory this process can write;
    otherwise one line naming the variable that placed it. Without this the libraries fail later,
    with an error that names the data file being read. A component's own `cache_dir` is its argument."""
    if cache_dir is not None:
        path, variable = Path(cache_dir).expanduser(), None
    elif cache == "hub":
        path, variable = Path(_cache_dir()).expanduser(), _variable(cache)
    else:
        import datasets

        path, variable = Path(datasets.config.HF_DATASETS_CACHE), _variable(cache)
    try:
        path.mkdir(parents=True, exist_ok=True)  # as the library would, first thing
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
        if variable is None:
            raise ArgumentError(
                "cache_dir", f"{path} cannot be written ({why}): give a directory this process can write"
            ) from None
        placed = f"{variable}={os.environ[variable]}" if variable in os.environ else "the default, as HF_HOME is unset"
        alternatives = ", ".join(v for v in _CACHE_VARIABLES[cache] if v not in (variable, "HUGGINGFACE_HUB_CACHE"))
        alternatives += ", or the dataset's cache_dir" if cache == "datasets" else ""
        raise LaunchError(
            variable,
            f"the Hugging Face {cache} cache {path} ({placed}), which {needed_by} writes into, cannot be written "
            f"({why}): set {variable} to a directory this process can write (or {alternatives})",
        ) from None


def _variable(cache: str) -> str:
    """The variable that placed `cache`: the first of its own that is set, else HF_HOME."""
    return next((v for v in _CACHE_VARIABLES[cache] if os.environ.get(v)), "HF_HOME")
