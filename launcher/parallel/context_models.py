"""Which models context parallelism can serve, and how their attention is given the group's keys.

- A model whose modules declare a `cp_context` (the built-in GPT's embedding and blocks,
  launcher/models/gpt.py): those modules are given the `Context`, and use it themselves (the
  positions of the rank's tokens, the gathered keys, the mask).
- A transformers model: an attention function registered with transformers (`AttentionInterface`,
  as `launcher_context`) replaces its attention; each attention module holds the `Context` (as
  `cp_context`), and the query position ids come in the keyword arguments transformers
  passes down. transformers builds no mask for a registered function without a mask function of
  its own: the one here builds its own.

Anything else (an MLP, a ResNet, a transformers model whose attention does not go through the
interface) is refused in one line, at `launcher check` too."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launcher.errors import RecipeError
from launcher.parallel.context import KEY, Context

NAME = "launcher_context"  # the attention implementation registered with transformers
ATTRIBUTE = "cp_context"  # where a module holds its Context


def check(model: nn.Module) -> None:
    """RecipeError for a model whose attention cannot be replaced."""
    _modules(model)


def apply(model: nn.Module, context: Context) -> None:
    """Give the model's attention the group (module doc)."""
    modules, is_transformers = _modules(model)
    for module in modules:
        setattr(module, ATTRIBUTE, context)
    if is_transformers:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, attention)
        model.config._attn_implementation = NAME  # type: ignore[union-attr]  # the config's setter sets sub-configs too


def _modules(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules that hold the Context, and whether the model is a transformers one."""
    own = [m for m in model.modules() if hasattr(type(m), ATTRIBUTE)]
    if own:
        return own, False
    config = getattr(model, "config", None)
    supports = getattr(model, "_supports_attention_backend", False)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise RecipeError(
            KEY,
            f"{type(model).__name__} has no attention the launcher can replace (the built-in GPT and transformers "
            "causal LMs have); context parallelism splits the sequences of language models: set "
            "dist.context_parallel=1",
        )
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if not supports or not found:
        raise RecipeError(
            KEY,
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, which is how "
            "context parallelism replaces it (Llama, Qwen2, Mistral and GPT-2 do); pick such a model or set "
            "dist.context_parallel=1",
        )
    return found, True


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # noqa: ARG001 - transformers builds none for this function
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [B, H, T/cp, D] in, [B, T/cp, H, D] out."""
    context: Context = getattr(module, ATTRIBUTE)
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise RecipeError(
                KEY,
                f"{type(module).__name__} uses attention with a {unsupported}, which context parallelism does not "
                "implement; set dist.context_parallel=1",
            )
    positions = kwargs.get("position_ids")
    if positions is None:
        raise RecipeError(
            KEY,
            f"{type(module).__name__} is not given the position ids its model was called with, which context "
            "parallelism needs to mask each document; set dist.context_parallel=1",
        )
    mask = context.mask(positions, query.size(2), query.device)
    out = context.attend(query, key, value, mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None
