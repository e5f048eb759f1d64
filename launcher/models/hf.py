"""Hugging Face transformers models in recipes (the [hf] extra, imported only when a recipe names them).

    model:
      _component_: launcher.models.hf.causal_lm
      config: {_component_: transformers.GPT2Config, n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 512}

or `pretrained: path/to/dir` (a directory `save_pretrained` wrote; never the hub: `local_files_only`).
Given `labels`, such a model computes its own loss (the recipe then names no loss), the mean over
the labels that are not -100, shifted by one: the launcher's token counting follows it
(launcher/batches.py). At the end of a run the weights are also written with `save_pretrained`
(`export`), so `from_pretrained(run_dir / "hf")` loads them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.components import require
from launcher.errors import ArgumentError


def causal_lm(config: Any = None, pretrained: str | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """`AutoModelForCausalLM.from_config(config)`, or `.from_pretrained(pretrained)` from a local directory."""
    transformers = require("transformers", "launcher.models.hf.causal_lm")
    if (config is None) == (pretrained is None):
        raise ArgumentError(
            "config",
            "give either config (a transformers config component) or pretrained (a directory save_pretrained wrote)",
        )
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ArgumentError(
                "pretrained", f"{path} {what}: name a local directory written by save_pretrained (the hub is not used)"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation, dtype=torch.float32
        )
    else:
        if not isinstance(config, transformers.PretrainedConfig):
            raise ArgumentError("config", f"expected a transformers config component, got a {type(config).__name__}")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if getattr(model, "loss_type", None) is None:
        # transformers guesses the loss from the class name, finds none in GPT2LMHeadModel's, and warns
        # `loss_type=None ... unrecognized` on every use; a causal LM's loss is the one it falls back to
        model.loss_type = "ForCausalLM"
    return model


def is_pretrained(model: nn.Module) -> bool:
    """A transformers model (it has save_pretrained); checked without importing transformers."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def export(model: nn.Module, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """`save_pretrained` with the run's final (whole, CPU) weights: safetensors and config.json,
    written into a temporary directory beside `directory` and renamed over it: a kill leaves the
    previous export or none, never a config.json without its weights."""
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)  # type: ignore[operator]  # a PreTrainedModel's
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
