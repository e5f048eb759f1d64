"""Losses the built-in recipes use, beyond torch.nn's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenCrossEntropy(nn.Module):
    """Cross-entropy of logits (..., vocab) against integer targets (...), averaged over tokens."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
