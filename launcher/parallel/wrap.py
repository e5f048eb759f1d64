"""The module the training step calls: model and loss in one forward, then activation
checkpointing inside, DDP outside (skipped at world size 1), torch.compile outermost.

Computing the loss inside the wrapped module lets checkpointing and torch.compile cover the whole
step: the last module (a language model's vocabulary projection) and the loss can be recomputed in
chunks, and inductor can fuse them.

Checkpointing is non-reentrant (`use_reentrant=False`): the reentrant variant runs backward inside
autograd's own backward, which DDP sees as a parameter being "marked ready twice", and which breaks
with `find_unused_parameters` and `static_graph`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from launcher.data import batches
from launcher.data.batches import LossFn
from launcher.errors import RecipeError

if TYPE_CHECKING:
    from launcher.recipe.schema import DDP

KEY = "train.activation_checkpointing"


class TrainModule(nn.Module):
    """forward(batch) -> loss: the model and the loss in one module (launcher/data/batches.py says how a
    tuple or a mapping batch reaches them; `loss_fn` None: the model computes its own loss).

    segments > 0: the model runs through checkpoint_sequential(model, segments, x, use_reentrant=False).
    head_chunks > 0: the last module and the loss instead run apart from the rest, in `head_chunks`
    slices of the batch, each checkpointed, so their activations (a language model's logits) exist
    for one slice at a time; the rest goes through checkpoint_sequential (if segments > 0). The loss
    is the mean of the slices' losses weighted by their sizes: the same mean over samples. Both
    need a tuple batch and an nn.Sequential model (`check_segments`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, segments: int = 0, head_chunks: int = 0) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.segments = segments
        self.head_chunks = head_chunks

    def outputs(self, features: Any) -> Any:
        """The model's outputs (evaluation). Under FSDP a registered forward method: it gathers too."""
        return batches.call(self.model, features)

    def _head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.model, nn.Sequential) and self.loss_fn is not None  # check_segments
        return self.loss_fn(self.model[-1](hidden), targets)

    def forward(self, batch: Any) -> torch.Tensor:
        features, targets = batches.features_and_targets(batch, self.loss_fn is None)
        if not (self.training and torch.is_grad_enabled()) or (self.segments == 0 and self.head_chunks == 0):
            return batches.loss_of(batches.call(self.model, features), targets, self.loss_fn)
        if self.loss_fn is None or batches.is_mapping(features):
            raise RecipeError(
                KEY,
                "segments and head_chunks need (inputs, targets) batches and a loss component; "
                "checkpoint the model's blocks by class instead (activation_checkpointing.modules)",
            )
        if self.head_chunks == 0:
            hidden = checkpoint_sequential(self.model, self.segments, features, use_reentrant=False)
            return self.loss_fn(hidden, targets)
        assert isinstance(self.model, nn.Sequential)
        body = self.model[:-1]
        if self.segments:
            hidden = checkpoint_sequential(body, self.segments, features, use_reentrant=False)
        else:
            hidden = body(features)
        n = hidden.shape[0]
        loss: Any = 0  # a tensor from the first chunk on (starting from a tensor would add an operator)
        for h, t in zip(hidden.tensor_split(self.head_chunks), targets.tensor_split(self.head_chunks), strict=True):
            if h.shape[0]:
                loss = loss + checkpoint(self._head_loss, h, t, use_reentrant=False) * (h.shape[0] / n)
        return loss


def check_segments(model: nn.Module, segments: int, head_chunks: int = 0) -> None:
    if segments <= 0 and head_chunks <= 0:
        return
    if not isinstance(model, nn.Sequential):
        what = "checkpoint_sequential" if segments > 0 else "head_chunks"
        raise RecipeError(
            f"{KEY}.{'segments' if segments > 0 else 'head_chunks'}",
            f"{what} needs an nn.Sequential model but model is {type(model).__name__}; "
            "build the model as nn.Sequential or turn activation checkpointing off",
        )
    usable = len(model) - (1 if head_chunks > 0 else 0)
    if segments > usable:
        raise RecipeError(
            f"{KEY}.segments",
            f"{segments} segments for {usable} module(s) "
            f"{'before the head ' if head_chunks else ''}of the Sequential; use at most {usable}",
        )


class Outputs(nn.Module):
    """Evaluation's model under FSDP: the root's `outputs`, so that the root gathers its parameters."""

    def __init__(self, root: TrainModule) -> None:
        super().__init__()
        self.root = root

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.root.outputs(kwargs or args[0])  # batches.call passes a mapping's keys as keywords


def wrap(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    segments: int,
    head_chunks: int,
    compile_: bool = False,
    distribute: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """The module the training step calls: the model and the loss in one TrainModule (activation
    checkpointing inside), then `distribute` (DDP or FSDP: the strategy's), then torch.compile.
    `model` itself stays the unwrapped one for saving and evaluation."""
    check_segments(model, segments, head_chunks)
    wrapped: nn.Module = TrainModule(model, loss_fn, segments, head_chunks)
    if distribute is not None:
        wrapped = distribute(wrapped)
    if compile_:
        return torch.compile(wrapped)  # type: ignore[return-value]  # an OptimizedModule, an nn.Module at run time
    return wrapped


def ddp(root: nn.Module, device: torch.device, cfg: DDP, comm_hook: Callable[..., Any] | None) -> nn.Module:
    """DDP around the TrainModule, with the recipe's dist.ddp settings and communication hook."""
    kwargs: dict[str, Any] = dict(
        find_unused_parameters=cfg.find_unused_parameters,
        static_graph=cfg.static_graph,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
    )
    if cfg.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = cfg.bucket_cap_mb
    wrapped = DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
    if comm_hook is not None:
        wrapped.register_comm_hook(state=None, hook=comm_hook)
    return wrapped


def checkpointed_modules(model: nn.Module, class_names: list[str]) -> list[nn.Module]:
    """The modules `activation_checkpointing.modules` names; a class the model lacks is a RecipeError."""
    return modules_of_classes(model, class_names, KEY + ".modules", "or turn it off ([])")


def checkpoint_modules(model: nn.Module, class_names: list[str]) -> None:
    """Activation checkpointing per block, for any model: every module of these classes recomputes
    its forward in the backward (non-reentrant). The forward is replaced in place, not wrapped in a
    new module, so parameter names (checkpoints, sharding units) stay those of the model."""
    found = checkpointed_modules(model, class_names)
    for module in found:
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
    config = getattr(model, "config", None)
    if found and config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # transformers: a generation cache is useless in training and breaks recomputation


def modules_of_classes(model: nn.Module, class_names: list[str], key: str, alternative: str) -> list[nn.Module]:
    """Every submodule whose class is named; a name the model lacks is a RecipeError for `key`."""
    names = set(class_names)
    present = {type(m).__name__ for m in model.modules()}
    unknown = sorted(names - present)
    if unknown:
        from launcher.recipe.schema import suggest

        listed = ", ".join(sorted(present)[:8]) + (", ..." if len(present) > 8 else "")
        raise RecipeError(
            key,
            f"no module of class {unknown[0]}{suggest(unknown[0], present)} in the model; "
            f"name classes it has ({listed}) {alternative}",
        )
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def eval_model(model: nn.Module, train_model: nn.Module) -> nn.Module:
    """What evaluation calls: the model itself, or under FSDP the root's `outputs`."""
    root = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    return Outputs(root) if isinstance(root, TrainModule) and _is_fsdp(root) else model


def ddp_gradient_sync(train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """DDP's no_sync for all but a window's last micro-batch."""
    root = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    assert isinstance(root, DistributedDataParallel), type(root)
    return contextlib.nullcontext() if enabled else root.no_sync()


def fsdp_gradient_sync(train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """FSDP's set_requires_gradient_sync: gradients accumulate unsharded until a window's last
    micro-batch, which reduce-scatters them."""
    root = getattr(train_model, "_orig_mod", train_model)
    # the setter walks every unit's state (0.3 ms a call on bench/fsdp.py's CPU GPT): call it on a change only
    if getattr(root, _SYNC_ATTR, None) is not enabled:
        root.set_requires_gradient_sync(enabled)  # type: ignore[operator]  # an FSDPModule's method
        setattr(root, _SYNC_ATTR, enabled)
    return contextlib.nullcontext()


_SYNC_ATTR = "_launcher_requires_gradient_sync"  # what gradient_sync last set on an FSDP root


def _is_fsdp(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")
