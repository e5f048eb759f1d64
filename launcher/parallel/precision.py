"""Mixed precision: the autocast context of a recipe's `train.precision`."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass: bf16 or fp16 autocast; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
