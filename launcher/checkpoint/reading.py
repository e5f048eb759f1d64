"""A checkpoint's model weights, whole, in this one process, whatever layout wrote them: a sharded
(fsdp/hsdp, tensor-parallel) checkpoint's DCP shards are read and joined; a ddp one's are copied out.
`launcher convert` writes them as model.pt; `launcher verify` compares them across layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint import checkpointer, frozen, sharded_state, step_dirs


def model_weights(step_dir: Path, payload: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """(the model's full state dict on the CPU, partial): `partial` when the checkpoint holds the
    trainable parameters only (a LoRA run's frozen base is rebuilt on resume, never saved).
    `payload`: the step's state.pt, if the caller has read it already (checkpointer.read)."""
    weights, base = model_state(step_dir, payload)
    return weights, base is not None


def model_state(step_dir: Path, payload: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(the model's full state dict on the CPU, the fingerprint of its frozen base): the fingerprint
    is None unless the checkpoint holds the trainable parameters only (launcher/checkpoint/frozen.py)."""
    payload = checkpointer.read(step_dir) if payload is None else payload
    if checkpointer.in_shards(payload, "model"):
        state = sharded_state.read_whole_state(step_dir / step_dirs.SHARDS, "model")
    else:
        state = payload["model"]
    weights = {k: v.cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return weights, state.get(frozen.BASE_KEY)
