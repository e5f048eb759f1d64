"""dist.strategy fsdp and hsdp: FSDP2 (`fully_shard`, torch >= 2.6) on an explicit device mesh.

Each sharding unit (a block) is `fully_shard`ed, then the root: the TrainModule, which runs the
model and the loss in one forward (launcher/parallel/wrap.py). The root being the module the step calls
means its forward gathers whatever parameters no unit holds, before activation checkpointing runs
the units one by one; evaluation calls the root too (`outputs`, registered as a forward method), so
every gathering goes through FSDP's hooks, on every rank alike.

The maths is DDP's: FSDP's reduce-scatter averages gradients over all data-parallel ranks (shard
group x replicas under hsdp), as DDP's all-reduce does, so the loop's loss scaling is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.errors import RecipeError
from launcher.parallel import wrap

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from launcher.recipe.schema import FSDP, Recipe

MIN_TORCH = (2, 6)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check(recipe: Recipe) -> None:
    """What can be refused before any process group exists: the torch version, a probe of the whole
    model. (The hsdp shape: parallel/dims.py.)"""
    strategy = recipe.dist.strategy
    if recipe.dist.tensor_parallel > 1 and torch_version() < MIN_TORCH:
        raise RecipeError(
            "dist.tensor_parallel",
            f"tensor parallelism needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer (DTensor); this is torch "
            f"{torch.__version__}: upgrade torch, or set dist.tensor_parallel=1",
        )
    if strategy == "ddp":
        return
    if torch_version() < MIN_TORCH:
        raise RecipeError(
            "dist.strategy",
            f"{strategy} needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer (FSDP2's fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch, or use dist.strategy=ddp",
        )
    if recipe.train.activation_checkpointing.segments == "auto":
        raise RecipeError(
            "train.activation_checkpointing.segments",
            f"auto probes the whole model on one device, which {strategy} exists to avoid; set a number of segments",
        )


def units(model: nn.Module, spec: str | list[str], keep_last_in_root: bool = False) -> list[nn.Module]:
    """The submodules sharded on their own. auto: an nn.Sequential's children (but the last, with
    `keep_last_in_root`: head_chunks calls it once per slice), else the children of every
    nn.ModuleList (a transformer's repeated blocks). Class names: every module of those classes."""
    if spec == "auto":
        if isinstance(model, nn.Sequential):
            children = list(model.children())
            found = children[:-1] if keep_last_in_root else children
        else:
            found = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m.children()]
        found = [m for m in found if any(True for _ in m.parameters())]
    else:
        found = wrap.modules_of_classes(model, list(spec), "dist.fsdp.units", "or use auto")
    _check_untied(model, found)
    return found


def _check_untied(model: nn.Module, found: list[nn.Module]) -> None:
    """A parameter shared by a unit and a module outside it (a tied embedding and head) cannot be
    sharded with both: FSDP would fail with a torch traceback at the first step."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    prefix = {id(m): name for name, m in model.named_modules()}
    for unit in found:
        inside = f"{prefix[id(unit)]}."
        for p in unit.parameters():
            outside = [n for n in names[id(p)] if not n.startswith(inside)]
            if outside:
                mine = next(n for n in names[id(p)] if n.startswith(inside))
                raise RecipeError(
                    "dist.fsdp.units",
                    f"{mine} is tied to {outside[0]}, outside its unit {type(unit).__name__}: a shared "
                    "parameter cannot be sharded in two units; leave one of the modules sharing it out of the units",
                )


def shard(
    root: nn.Module,
    model: nn.Module,
    cfg: FSDP,
    mesh: DeviceMesh,
    precision: str,
    head_chunks: int,
    forward_method: str | None = "outputs",
) -> nn.Module:
    """fully_shard the units of `model`, then `root` (which holds `model`), whose `forward_method`
    (evaluation's, on the TrainModule) gathers as its forward does; returns `root`."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPE[precision], reduce_dtype=DTYPES[cfg.reduce_dtype])
    # pinned host memory needs a GPU
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    kwargs: dict[str, Any] = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
    for unit in units(model, cfg.units, keep_last_in_root=head_chunks > 0):
        fully_shard(unit, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    fully_shard(root, **kwargs)
    if forward_method is not None:
        register_fsdp_forward_method(root, forward_method)
    return root


def materialize(model: nn.Module, device: torch.device) -> None:
    """dist.fsdp.meta_init: give a sharded meta-device model real shards on `device`, initialised
    per shard: the model's own `init_weights()` if it has one, else each module's
    `reset_parameters()`. The caller seeds each rank differently (shards are different rows)."""
    init_weights = getattr(model, "init_weights", None)
    if not callable(init_weights):
        buffers = [name for name, _ in model.named_buffers()]
        bare = [type(m).__name__ for m in model.modules() if _own_params(m) and not hasattr(m, "reset_parameters")]
        if buffers or bare:
            what = f"buffer {buffers[0]}" if buffers else f"{bare[0]} has parameters but no reset_parameters()"
            raise RecipeError(
                "dist.fsdp.meta_init",
                f"{what}: a meta-device build cannot initialise it (give the model an init_weights() method, "
                "as torchtitan's models have) ; set dist.fsdp.meta_init=false",
            )
    model.to_empty(device=device)
    with torch.no_grad():
        if callable(init_weights):
            init_weights()
            return
        for m in model.modules():
            if _own_params(m):
                m.reset_parameters()  # type: ignore[operator]  # checked above


def agree_replicas(model: nn.Module, mesh: DeviceMesh) -> None:
    """After `materialize`: ranks that hold the same piece of a tensor must hold the same values,
    but each drew its own (per-rank seeds give the shards distinct draws). Those are hsdp's replicas
    (and ddp x tp's, FSDP replicating), and the ranks of a tensor-parallel group for whatever the
    plan does not split (embeddings, norms, a rowwise bias): each such group's first rank sends its
    values to the others. Shards along dp_shard, and tensor-parallel shards, are left as drawn."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    copies_along = [name for name in mesh.mesh_dim_names or () if name in ("dp_replicate", "tp")]
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            split: set[str] = set()
            if isinstance(tensor, DTensor):
                names = tensor.device_mesh.mesh_dim_names or ()
                split = {name for name, p in zip(names, tensor.placements, strict=True) if isinstance(p, Shard)}
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # a view of the shard
            buffer = local.contiguous()  # the view itself where it is contiguous, as collectives need
            for name in copies_along:
                if name not in split:
                    group = mesh[name].get_group()
                    dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group)
            if buffer.data_ptr() != local.data_ptr():
                local.copy_(buffer)


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))
