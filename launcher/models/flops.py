"""Training FLOPs per sample, for the step-time estimate (`launcher check`, the run's first line of
timing) and MFU in the metrics. The built-in GPT counts its own (`flops_per_sample`); a transformers
decoder's is estimated here from its config and parameter count, as in the scaling-law papers: a
forward is 2 FLOPs per parameter per token, the backward 2 more for the activations' gradients and 2
for the weights' (trainable parameters only: LoRA's frozen base computes none), and attention's two
matmuls (scores and their weighted sum) add 4 x layers x tokens^2 x width per forward, as PaLM counts
them: fully trained, the same figure the built-in GPT gives itself. Embedding lookups are counted as matmuls (an
overestimate of a few percent on small vocabularies)."""

from __future__ import annotations

from typing import Any

from torch import nn


def flops_per_sample(model: nn.Module, dataset: Any) -> float | None:
    """The model's own figure, else a transformers decoder's estimate at the dataset's sequence length
    (its samples' tokens: packed, or the longest cut); None when neither is known."""
    own = getattr(model, "flops_per_sample", None)
    if isinstance(own, (int, float)) and own > 0:
        return float(own)
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    tokens = sequence_length(dataset)
    if not (isinstance(layers, int) and isinstance(width, int) and tokens):
        return None
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = 4 * layers * tokens * tokens * width  # forward; the backward twice that
    return float((4 * total + 2 * trained) * tokens + 3 * attention)


def sequence_length(dataset: Any) -> int | None:
    for name in ("tokens_per_sample", "max_sequence_length"):
        value = getattr(dataset, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
