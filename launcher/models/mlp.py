from __future__ import annotations

from torch import nn


def MLP(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Flatten, then Linear-ReLU layers through `sizes` (input, hidden..., output)."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
