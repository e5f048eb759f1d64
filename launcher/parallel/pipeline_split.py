"""A model split into pipeline stages whose parameter names (FQNs) are the whole model's.

As torchtitan's `pipeline_module_split`, a stage holds only what it owns, under the names the whole
model gives it, so a checkpoint written at one layout resumes at any other. Unlike it, nothing is
deep-copied: a stage is a new container around the whole model's own submodules, so splitting needs
no second copy of the weights; once the caller drops the whole model, the blocks of other ranks'
stages are freed.

- The built-in GPT, or any nn.Sequential that declares `pipeline_ends = (first, last)`, its children
  before and after the blocks: a stage is the same Sequential class holding the children it owns under
  their names in the whole model (the GPT's "0" embeddings, "1".."n" blocks, "n+1" norm, "n+2" head).
- transformers decoder-only causal LMs (`SUPPORTED`): a `CausalLMStage` with the whole model's
  top-level names (`model.layers.3`, `transformer.h.3`, `lm_head`), the layers in a ModuleDict keyed
  by their index in the whole model. Its forward takes input ids on stage 0 and hidden states after,
  builds the positions, the rotary embeddings and the causal mask itself, and returns hidden states,
  or logits on the last stage. The mask is causal only: stages after the first see no attention mask,
  which is exact for right-padded batches (a token never attends to the padding after it).
- Tied input and output embeddings are refused: stage 0 and the last stage would each train a copy.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from launcher.errors import RecipeError
from launcher.parallel.pipeline import PP_KEY

# transformers model types split here: (decoder attribute, layers, embeddings, final norm)
SUPPORTED = {
    "llama": ("model", "layers", ("embed_tokens",), "norm"),
    "qwen2": ("model", "layers", ("embed_tokens",), "norm"),
    "gpt2": ("transformer", "h", ("wte", "wpe", "drop"), "ln_f"),
}


def n_blocks(model: nn.Module) -> int:
    """The blocks `stage_layers` splits: the GPT's, or the transformers model's decoder layers."""
    if _is_sequential(model):
        first, last = model.pipeline_ends  # type: ignore[misc]
        return len(model) - first - last  # type: ignore[arg-type]
    decoder, layers, _, _ = _hf_layout(model)
    return len(getattr(getattr(model, decoder), layers))


def split_model(model: nn.Module, layers: list[range], ids: list[int]) -> list[nn.Module]:
    """The stage modules `ids` of `model` split as `layers` (pipeline.stage_layers) says."""
    if _is_sequential(model):
        return [_sequential_stage(model, layers, i) for i in ids]
    _hf_layout(model)
    return [CausalLMStage(model, layers, i) for i in ids]


def _is_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and hasattr(model, "pipeline_ends")


def _sequential_stage(model: nn.Module, layers: list[range], index: int) -> nn.Module:
    first, last = model.pipeline_ends  # type: ignore[misc]
    children = list(model.named_children())
    owned = [children[first + b] for b in layers[index]]
    if index == 0:
        owned = children[:first] + owned
    if index == len(layers) - 1:
        owned += children[len(children) - last :]
    stage = type(model)(OrderedDict(owned))
    for name in ("flops_per_sample", "tokens_per_sample", "vocab_size", "max_positions"):
        if hasattr(model, name):
            setattr(stage, name, getattr(model, name))
    return stage


def _hf_layout(model: nn.Module) -> tuple[str, str, tuple[str, ...], str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in SUPPORTED or not hasattr(model, "lm_head"):
        what = (
            f"a transformers {model_type!r} model"
            if model_type
            else "neither the built-in GPT nor a transformers model"
        )
        raise RecipeError(
            PP_KEY,
            f"cannot split {name} into pipeline stages: it is {what}, and only the built-in GPT and transformers "
            f"{', '.join(SUPPORTED)} causal LMs have known embeddings, blocks and head; set dist.pipeline_parallel: 1",
        )
    head = model.lm_head.weight  # type: ignore[union-attr]
    if any(p is head for p in model.get_input_embeddings().parameters()):  # type: ignore[operator]
        raise RecipeError(
            PP_KEY,
            f"{name} ties its input embeddings to its head (config.tie_word_embeddings), which pipeline stages "
            "put on different ranks; set model.config.tie_word_embeddings: false (the head then trains apart "
            "from the embeddings) or dist.pipeline_parallel: 1",
        )
    return SUPPORTED[model_type]


class CausalLMStage(nn.Module):
    """One pipeline stage of a transformers decoder-only causal LM, under the whole model's names."""

    def __init__(self, model: nn.Module, layers: list[range], index: int):
        super().__init__()
        decoder_name, layers_name, embedding_names, norm_name = _hf_layout(model)
        whole = getattr(model, decoder_name)
        config: Any = model.config
        self.config, self.model_type = config, str(config.model_type)
        self.is_first, self.is_last = index == 0, index == len(layers) - 1
        self.layer_ids = list(layers[index])
        self.decoder_name, self.layers_name = decoder_name, layers_name
        decoder = nn.Module()  # a plain container: only its children's names matter
        if self.is_first:
            for name in embedding_names:
                decoder.add_module(name, getattr(whole, name))
        all_layers = getattr(whole, layers_name)
        decoder.add_module(layers_name, nn.ModuleDict({str(i): all_layers[i] for i in self.layer_ids}))
        if hasattr(whole, "rotary_emb"):
            decoder.add_module("rotary_emb", whole.rotary_emb)  # buffers only: every stage has it
        if self.is_last:
            decoder.add_module(norm_name, getattr(whole, norm_name))
        self.add_module(decoder_name, decoder)
        self.norm_name = norm_name
        if self.is_last:
            self.lm_head: nn.Module = model.lm_head  # type: ignore[assignment]
        # dist.context_parallel (launcher/parallel/context_models.py): this rank's tokens of each sequence
        held = (getattr(m, "cp_context", None) for m in model.modules())
        self.cp_context = next((c for c in held if c is not None), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoder = getattr(self, self.decoder_name)
        length = x.shape[1]
        if self.cp_context is not None:  # a head and a tail chunk of the sequence: their global positions
            positions = self.cp_context.local_index(length, x.device).unsqueeze(0)
        else:
            positions = torch.arange(length, device=x.device).unsqueeze(0)
        if self.is_first:
            if self.model_type == "gpt2":
                x = decoder.drop(decoder.wte(x) + decoder.wpe(positions))
            else:
                x = decoder.embed_tokens(x)
        kwargs: dict[str, Any] = {"position_ids": positions}
        if hasattr(decoder, "rotary_emb"):
            kwargs["position_embeddings"] = decoder.rotary_emb(x, positions)
        masks = _causal_masks(self.config, x, positions)
        layer_types = getattr(self.config, "layer_types", None)
        for i, layer in getattr(decoder, self.layers_name).items():
            kind = layer_types[int(i)] if layer_types else "full_attention"
            out = layer(x, attention_mask=masks[kind], **kwargs)
            x = out[0] if isinstance(out, tuple) else out  # transformers < 4.54's layers return tuples
        if self.is_last:
            x = self.lm_head(getattr(decoder, self.norm_name)(x))
        return x


def _causal_masks(config: Any, embeds: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
    """The masks the whole model builds with no attention mask, by layer type (Qwen2's sliding-window
    layers have their own); None where the attention implementation is causal by itself (sdpa)."""
    from transformers import masking_utils

    def build(fn: Any) -> Any:
        params = inspect.signature(fn).parameters
        kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "position_ids": positions}
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
        if "cache" in params:
            kwargs["cache"] = None
        else:  # transformers 4.5x
            kwargs["past_key_values"] = None
            kwargs["cache_position"] = positions[0]
        return fn(**kwargs)

    masks = {"full_attention": build(masking_utils.create_causal_mask)}
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        masks["sliding_attention"] = build(masking_utils.create_sliding_window_causal_mask)
    return masks


def held(stages: list[nn.Module]) -> nn.Module:
    """One module over this rank's stages whose parameter names are the whole model's (the GPT's "3.q.weight",
    a transformers model's "model.layers.3..."): what the optimizer, the checkpoint (DCP, by name) and the
    gradient norm see. Where two stages share a container's name (a transformers model's `model`), a new
    container holds both stages' children: the stages' own are left as they are, so each runs its own layers."""
    tree: dict[str, Any] = {}
    for stage in stages:
        _graft(tree, stage)
    return _build(tree)


def _graft(tree: dict[str, Any], module: nn.Module) -> None:
    for name, child in module.named_children():
        have = tree.get(name)
        if have is None:
            tree[name] = child
        elif have is not child:
            if isinstance(have, nn.Module):
                assert not any(True for _ in have.parameters(recurse=False)), f"{name} holds parameters of its own"
                have = dict(have.named_children())
            assert not any(True for _ in child.parameters(recurse=False)), f"{name} holds parameters of its own"
            _graft(have, child)
            tree[name] = have


def _build(tree: dict[str, Any]) -> nn.Module:
    root = nn.Module()
    for name, value in tree.items():
        root.add_module(name, _build(value) if isinstance(value, dict) else value)
    return root
