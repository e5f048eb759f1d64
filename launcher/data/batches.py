"""What a batch is, how it goes through the model and the loss, and what the loss's mean counts.

A batch is a tuple `(inputs, targets)` or a mapping of named tensors (transformers' convention:
`input_ids`, `attention_mask`, `labels`). Three ways from a batch to a loss:

- a tuple and a loss component: `loss(model(inputs), targets)`;
- a mapping and a loss component: `loss(logits, batch["labels"])`, the logits being the model's
  output (or its `.logits`) given the batch's other keys as keyword arguments;
- a mapping and no loss component: the model computes it, `model(**batch).loss` (transformers
  models do when given `labels`).

A mapping with `position_ids` holds packed documents (launcher/datasets/packing.py): the model is
given no `attention_mask` (which marks only the padding at the right there, and is kept in the
batch to count real tokens), so that it keeps attention inside each document from the position
ids, as transformers models do only without a mask and without a generation cache
(`use_cache=False` is passed to a model whose config would make one).

Every loss is a mean over what it counts. The loop makes each optimizer step's loss the mean over
the whole window (every micro-batch of every rank) by weighting each micro-batch's mean with its
count: its real samples, or its valid tokens (labels that are not `IGNORE_INDEX`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launcher.errors import RecipeError

LABELS = "labels"
POSITION_IDS = "position_ids"  # packed documents: they restart at 0 at each one
ATTENTION_MASK = "attention_mask"
SHIFTED_LABELS = "shift_labels"  # transformers' name for labels already aligned with the logits
IGNORE_INDEX = -100  # torch's cross_entropy default, and transformers' padding label

LossFn = Callable[..., torch.Tensor]


def is_mapping(batch: Any) -> bool:
    return isinstance(batch, Mapping)


def features_and_targets(batch: Any, model_computes_loss: bool) -> tuple[Any, Any]:
    """What the model is called with, and what the loss component compares its output with."""
    if is_mapping(batch):
        if POSITION_IDS in batch and ATTENTION_MASK in batch:  # packed: the mask would hide the documents
            batch = {k: v for k, v in batch.items() if k != ATTENTION_MASK}
        if model_computes_loss:
            return batch, None
        if LABELS not in batch:
            raise RecipeError("data", f"a mapping batch needs a {LABELS!r} key for the loss; it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    if model_computes_loss:
        raise no_loss_for(batch)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise RecipeError("data", f"a batch must be (inputs, targets) or a mapping; got {_describe(batch)}")
    return batch[0], batch[1]


def no_loss_for(sample: Any) -> RecipeError:
    """A recipe without a loss whose data is not a mapping: the model has no labels to compute one from."""
    return RecipeError(
        "loss",
        f"the recipe names no loss, so the model must compute its own from a mapping batch with "
        f"{LABELS!r}, but the data yields {type(sample).__name__}s; add a loss component",
    )


def call(model: nn.Module | Callable[..., Any], features: Any) -> Any:
    if not is_mapping(features):
        return model(features)
    if POSITION_IDS in features and getattr(getattr(model, "config", None), "use_cache", False):
        # transformers builds no document mask beside a generation cache, which training does not use
        return model(**features, use_cache=False)
    return model(**features)


def logits_of(outputs: Any) -> Any:
    """A transformers ModelOutput's logits, or the output itself."""
    logits = getattr(outputs, "logits", None)
    return outputs if logits is None else logits


def loss_of(outputs: Any, targets: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(logits_of(outputs), targets)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise RecipeError(
            "loss",
            f"the recipe names no loss and the model's output ({type(outputs).__name__}) has none: "
            f"give the batch {LABELS!r} (transformers models then compute it) or add a loss component",
        )
    return loss


@dataclass(frozen=True)
class Counting:
    """What a micro-batch's loss is the mean over: tokens (valid labels) or samples; `shift`: a
    transformers causal LM computing its own loss predicts labels[..., 1:], so those are counted."""

    tokens: bool
    shift: bool = False

    @classmethod
    def of(cls, loss_mean_over: str, model: nn.Module, model_computes_loss: bool) -> Counting:
        tokens = loss_mean_over == "tokens" or (loss_mean_over == "auto" and model_computes_loss)
        return cls(tokens, shift=tokens and model_computes_loss and _shifts_labels(model))

    def describe(self) -> str:
        if not self.tokens:
            return "samples"
        return f"tokens (labels != {IGNORE_INDEX}{', shifted by one' if self.shift else ''})"


def _shifts_labels(model: nn.Module) -> bool:
    """Does the model's own loss predict labels[..., 1:]? transformers' causal LMs (GPT2LMHeadModel,
    LlamaForCausalLM, ...) compute theirs with `ForCausalLMLoss`; other models say so with a
    `shifts_labels` attribute (the built-in GPT)."""
    if getattr(model, "shifts_labels", False) is True:
        return True
    try:
        loss_function = getattr(model, "loss_function", None)  # a transformers model's property
    except Exception:  # a model whose attribute raises has no such loss
        return False
    return getattr(loss_function, "__name__", None) == "ForCausalLMLoss"


def valid_tokens(batch: Any, shift: bool) -> int:
    """The labels a token loss averages over (not IGNORE_INDEX), in a batch on the CPU: no device sync."""
    if is_mapping(batch):
        if SHIFTED_LABELS in batch:
            labels, shift = batch[SHIFTED_LABELS], False
        elif LABELS in batch:
            labels = batch[LABELS]
        else:
            raise RecipeError("train.loss_mean_over", f"tokens are counted in {LABELS!r}, which the batch lacks")
    else:
        labels = batch[1]
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise RecipeError(
            "train.loss_mean_over",
            f"tokens are counted in integer labels, but the labels are {_describe(labels)}; "
            "use loss_mean_over=samples for other targets",
        )
    if shift:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def real_tokens(batch: Any) -> tuple[int, int] | None:
    """(real tokens, token positions) of a padded mapping batch on the CPU, from its attention mask
    (the padding fraction in the metrics); None for a batch without one."""
    if not is_mapping(batch) or not isinstance(batch.get(ATTENTION_MASK), torch.Tensor):
        return None
    mask = batch[ATTENTION_MASK]
    return int(mask.count_nonzero()), mask.numel()


def without_ignored_labels(batch: Any, shift: bool = False) -> Any:
    """The batch with every ignored label made a valid class (0), for a micro-batch that counts no
    token: its loss is then finite, and the loop weights it by exactly 0. `shift` (a causal LM's own
    loss, which predicts labels[..., 1:] and pads the last position with -100): the model is given
    `shift_labels` of 0 instead, as valid labels made so would still leave a micro-batch of
    one-token sequences with no position to predict."""
    if is_mapping(batch):
        if shift and SHIFTED_LABELS not in batch:
            return {**batch, SHIFTED_LABELS: torch.zeros_like(batch[LABELS])}
        key = SHIFTED_LABELS if SHIFTED_LABELS in batch else LABELS
        return {**batch, key: batch[key].masked_fill(batch[key] == IGNORE_INDEX, 0)}
    return type(batch)([batch[0], batch[1].masked_fill(batch[1] == IGNORE_INDEX, 0), *batch[2:]])


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
