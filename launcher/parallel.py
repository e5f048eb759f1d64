"""Model wrapping: activation checkpointing inside, DDP outside, nothing at world size 1.

Checkpointing is non-reentrant (`use_reentrant=False`): the reentrant variant runs backward inside
autograd's own backward, which DDP sees as a parameter being "marked ready twice" and which breaks
with `find_unused_parameters` and `static_graph`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint_sequential

from launcher.errors import RecipeError


class CheckpointedSequential(nn.Module):
    """Runs an nn.Sequential through checkpoint_sequential while training; plainly otherwise."""

    def __init__(self, seq: nn.Sequential, segments: int):
        super().__init__()
        self.seq = seq
        self.segments = segments

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return checkpoint_sequential(self.seq, self.segments, x, use_reentrant=False)
        return self.seq(x)


def check_segments(model: nn.Module, segments: int, key: str = "train.activation_checkpointing.segments") -> None:
    if segments <= 0:
        return
    if not isinstance(model, nn.Sequential):
        raise RecipeError(key, f"checkpoint_sequential needs an nn.Sequential model but model is {type(model).__name__}; "
                               "build the model as nn.Sequential or set segments: 0")
    if segments > len(model):
        raise RecipeError(key, f"{segments} segments for a Sequential of {len(model)} modules; use at most {len(model)}")


def wrap(model: nn.Module, *, segments: int, world_size: int, device: torch.device, ddp_cfg, comm_hook=None) -> nn.Module:
    """The module the training step calls. `model` itself stays the unwrapped one for saving/eval."""
    check_segments(model, segments)
    wrapped: nn.Module = CheckpointedSequential(model, segments) if segments > 0 else model
    if world_size == 1:
        return wrapped
    kwargs = dict(
        find_unused_parameters=ddp_cfg.find_unused_parameters,
        static_graph=ddp_cfg.static_graph,
        gradient_as_bucket_view=ddp_cfg.gradient_as_bucket_view,
    )
    if ddp_cfg.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = ddp_cfg.bucket_cap_mb
    ddp = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
    if comm_hook is not None:
        ddp.register_comm_hook(state=None, hook=comm_hook)
    return ddp
