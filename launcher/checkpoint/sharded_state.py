"""Model and optimizer state as torch.distributed.checkpoint (DCP) keeps it: keyed by parameter
name, sharded under FSDP (each rank holds and writes its own shards), whole under DDP.

Keyed by name rather than by position, a checkpoint written by N ranks loads at any other world
size, and under either strategy: DCP reads, for each rank, the pieces of each tensor that rank now
holds (resharding), and into whole tensors for a DDP run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.checkpoint import dcp_safe, frozen, step_dirs
from launcher.storage import sha256_of


class ModelState:
    """Stateful over DCP's get/set_model_state_dict: the trainable parameters and buffers, and the
    frozen base's fingerprint (launcher/checkpoint/frozen.py)."""

    def __init__(self, model: nn.Module, base: str | None = None, source: str = "the checkpoint") -> None:
        self.model, self.base, self.source = model, base, source

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # by our own list, not DCP's ignore_frozen_params: that one keeps a frozen weight's tied twin
        state = frozen.trainable_state(get_model_state_dict(self.model), frozen.frozen_names(self.model))
        return frozen.with_base(state, self.base)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        frozen.check_base(state_dict.get(frozen.BASE_KEY), self.base, self.source)
        tensors = {k: v for k, v in state_dict.items() if k != frozen.BASE_KEY}
        # the frozen parameters are not in it: they were built again (the keys were checked on resume)
        set_model_state_dict(self.model, tensors, options=StateDictOptions(strict=not frozen.frozen_names(self.model)))


class OptimizerState:
    """Stateful over DCP's get/set_optimizer_state_dict. Also loads a DDP checkpoint's optimizer
    state (torch's own format, keyed by position) into a sharded optimizer."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, positional_names: list[str] | None = None
    ) -> None:
        self.model, self.optimizer = model, optimizer
        # the names behind torch's positional format, where `model` holds only some of the model's
        # parameters (a pipeline stage's): the whole model's trainable ones, in order
        self.positional_names = positional_names

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = None
        if any(isinstance(k, int) for k in state_dict.get("state", {})) or _positional_groups(state_dict):
            state_dict, options = self._by_name(state_dict), StateDictOptions(full_state_dict=True)
        else:
            state_dict = self._own_groups(state_dict)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=options)

    def _own_groups(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """DCP keeps one copy of the param groups, the first rank's: under pipeline parallelism they
        name another stage's parameters. Each group's settings are the saved ones (the learning rate
        where the schedule left it), its parameters this optimizer's own, group by group."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        saved: list[dict[str, Any]] = list(state_dict.get("param_groups") or [])
        mine: list[dict[str, Any]] = list(get_optimizer_state_dict(self.model, self.optimizer)["param_groups"])  # type: ignore[arg-type]
        if len(saved) != len(mine):
            return state_dict
        pairs = list(zip(saved, mine, strict=True))
        if all(set(g["params"]) == set(m["params"]) for g, m in pairs):
            return state_dict
        return dict(state_dict, param_groups=[dict(g, params=m["params"]) for g, m in pairs])

    def _by_name(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """torch's optimizer format numbers parameters in the order of the param groups; this
        optimizer was built the same way over the same model, so position i is the same parameter."""
        names = {p: n for n, p in self.model.named_parameters()}
        if self.positional_names is None:
            order = [names[p] for group in self.optimizer.param_groups for p in group["params"]]
            return {
                "state": {order[i]: v for i, v in state_dict["state"].items()},
                "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in state_dict["param_groups"]],
            }
        order, mine = self.positional_names, set(names.values())
        return {
            "state": {order[i]: v for i, v in state_dict["state"].items() if order[i] in mine},
            "param_groups": [
                dict(g, params=[order[i] for i in g["params"] if order[i] in mine]) for g in state_dict["param_groups"]
            ],
        }


def _positional_groups(state_dict: Mapping[str, Any]) -> bool:
    groups = state_dict.get("param_groups") or []
    return bool(groups) and any(isinstance(p, int) for g in groups for p in g.get("params", []))


def _writer(directory: Path, digests: dict[str, str]) -> Any:
    """DCP's FileSystemWriter, which also puts the sha256 of each file this rank wrote into
    `digests` (by name; read back while the file is still in the page cache). Tests kill a rank
    once its shards are written, inside the save."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            written.wait()
            for name in sorted({result.storage_data.relative_path for result in written.value()}):
                digests[name] = sha256_of(directory / name)
            step_dirs.crash_point("inside-shards")
            return written

    return Writer(str(directory))


def save(directory: Path, states: Mapping[str, Any], process_group: Any = None) -> dict[str, str]:
    """Every rank: write its shards of each state (an object's state_dict(), keyed by the object's
    name) into `directory` (DCP's layout: one file per rank, plus .metadata from the coordinator),
    coordinating over `process_group` (None: the default group). Returns the sha256 of the files
    this rank wrote, by name."""
    import torch.distributed.checkpoint as dcp

    digests: dict[str, str] = {}
    dcp.save(dict(states), storage_writer=_writer(directory, digests), process_group=process_group)
    return digests


def load(directory: Path, objects: Mapping[str, Any]) -> None:
    """Every rank: read into each object's current state (its shapes and shards say what to read)."""
    import torch.distributed.checkpoint as dcp

    from launcher.cluster import distributed

    dcp_safe.check_metadata(directory, "checkpoint.resume")
    states = {name: obj.state_dict() for name, obj in objects.items()}
    with warnings.catch_warnings():
        # one process (a sharded checkpoint resumed without a process group) reads everything
        # itself, on purpose: DCP's warning that it assumes so is noise
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        dcp.load(
            states,
            storage_reader=dcp_safe.reader(str(directory)),
            planner=dcp_safe.planner(),
            no_dist=not distributed.is_initialized(),
        )
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def saved_shapes(directory: Path, name: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor saved under `name` (e.g. the model's), from DCP's metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp_safe.check_metadata(directory, "checkpoint.resume")
    metadata = dcp_safe.reader(str(directory)).read_metadata()
    prefix = f"{name}."
    return {
        key[len(prefix) :]: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


def saved_keys(directory: Path, name: str) -> set[str]:
    """Every key saved under `name`, tensors and other objects alike, from DCP's metadata."""
    prefix = f"{name}."
    metadata = dcp_safe.reader(str(directory)).read_metadata()
    return {key[len(prefix) :] for key in metadata.state_dict_metadata if key.startswith(prefix)}


def full_model_state(model: nn.Module, sharded: bool, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, for model.pt. Sharded: every rank calls it; torch
    gathers one parameter at a time into rank 0's host memory (the others get {}), so no rank
    ever holds more than one full copy; `every_rank`: each rank gets them (a pipeline stage's, which
    the stage's ranks then send on)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    full = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in full.items() if isinstance(v, torch.Tensor)}


def read_whole(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """One object's state from a sharded checkpoint, every tensor whole, in this one process (the
    conversion to a single file; DCP's format_utils reads the same way)."""
    return {k: v for k, v in read_whole_state(directory, name).items() if isinstance(v, torch.Tensor)}


def read_whole_state(directory: Path, name: str) -> dict[str, Any]:
    """read_whole, with the values that are no tensors (the frozen base's fingerprint)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    dcp_safe.check_metadata(directory, "CHECKPOINT")
    state: dict[str, Any] = {}
    planner = dcp_safe.planner(empty=True, keys={name})  # builds the tensors from the metadata
    _load_state_dict(state, storage_reader=dcp_safe.reader(str(directory)), planner=planner, no_dist=True)
    return dict(state[name])


def load_whole_model(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Whole tensors (a ddp checkpoint's) into a sharded model: each rank keeps its own pieces."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors = {k: v for k, v in state.items() if k != frozen.BASE_KEY}
    strict = not frozen.frozen_names(model)  # frozen parameters are not checkpointed
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=strict))
