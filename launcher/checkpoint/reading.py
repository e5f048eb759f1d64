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
    payload = checkpointer.read(step_dir) if payload is None else payload
    if "model" in payload.get("sharded", []):
        weights = sharded_state.read_whole(step_dir / step_dirs.SHARDS, "model")
        return weights, frozen.BASE_KEY in sharded_state.saved_keys(step_dir / step_dirs.SHARDS, "model")
    weights = {k: v.cpu() for k, v in payload["model"].items() if hasattr(v, "cpu")}
    return weights, frozen.BASE_KEY in payload["model"]
