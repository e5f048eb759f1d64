"""Reading a DCP (sharded) checkpoint without letting it run code.

torch's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its load planners read
the non-tensor values in the shard files with `torch.load(weights_only=False)`: a crafted file would
run a command on resume or on `launcher convert`. Here `.metadata` is unpickled by an unpickler
that builds only DCP's own metadata classes (and the few torch and pathlib types they hold), and
non-tensor values are read with `torch.load(weights_only=True)`. The sha256 of every file in the
COMPLETE marker (launcher/checkpoint/step_dirs.py) is the other half: it finds accidental damage before
anything is read.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from launcher.errors import RecipeError

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}  # Metadata and its dataclasses
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class UnsafeMetadata(pickle.UnpicklingError):
    """`.metadata` names something other than DCP's metadata types."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise UnsafeMetadata(f"it names {module}.{name}, which DCP's metadata never holds")


def read_metadata(data: bytes) -> Any:
    return _MetadataUnpickler(io.BytesIO(data)).load()


def check_metadata(directory: Path, key: str) -> None:
    """Read `directory/.metadata` restrictedly before DCP does (whose wrapping of errors inside a
    load would hide this one): a file that is no DCP metadata is a RecipeError for `key`."""
    path = directory / ".metadata"
    try:
        read_metadata(path.read_bytes())
    except Exception as e:  # UnsafeMetadata, or bytes that are no pickle at all
        raise RecipeError(
            key,
            f"{path} is not DCP metadata ({type(e).__name__}: {e}); it was not read further: use another checkpoint",
        ) from None


def reader(directory: str) -> Any:
    """A FileSystemReader whose `.metadata` is read by the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = read_metadata(f.read())
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(directory)


def planner(empty: bool = False, **kwargs: Any) -> Any:
    """DCP's default load planner (or `empty`: the one that builds the state from the metadata, for
    conversion) reading non-tensor values with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class Planner(base):  # type: ignore[valid-type, misc]  # a class chosen at run time
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return Planner(**kwargs)
