"""The parallelism seam: one strategy object per kind, chosen once from the recipe. The assembly,
the loop and the checkpointer call it and never ask which kind they have.

- `Whole`: one process (or simulated ranks): the model as it is.
- `Replicated`: dist.strategy=ddp on several ranks: DDP, every rank a whole replica.
- `Sharded`: dist.strategy=fsdp/hsdp (FSDP2 on a device mesh), at any world size, even one.

Each answers everything the loop asks, without the loop knowing the layout: its parallel dimensions
(`dims`: the data-parallel size and rank everything about data uses), whether the model is built on
the meta device, the checks made before its weights move, how the step's module is wrapped
(activation checkpointing, then DDP or FSDP, then compile, in torchtitan's order), gradient sync on
or off for a micro-step, the autocast around the forward, the sums over the ranks that read
different data (token counts, evaluation totals, the logged loss), the gradient norm and clipping,
what a checkpoint keeps in DCP shards, the whole model's weights for model.pt, and the module
evaluation calls."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.checkpoint import frozen, sharded_state
from launcher.cluster import distributed
from launcher.errors import RecipeError
from launcher.parallel import context_batches, context_models, gradients, sharding, tensor, wrap
from launcher.parallel.context import Context
from launcher.parallel.dims import ParallelDims
from launcher.parallel.precision import autocast

if TYPE_CHECKING:
    from launcher.data.batches import LossFn
    from launcher.recipe.schema import Recipe

CHECKPOINT_SHARDS = frozenset({"model", "optimizer"})  # the objects a sharded run keeps in DCP shards


class Strategy:
    """One process with the whole model; the base every kind refines."""

    meta_init = False  # build the model on the meta device (shards are initialised once they exist)
    runs_windows = False  # the loop hands `step_window` whole windows (a pipeline's schedule), not micro-batches
    holds_whole_model = True  # False: `held` is some of the model (its weights whole only once gathered)
    stages_take_ids = False  # True: the model's stages take token ids alone, and compute the positions themselves
    shards_in_checkpoint: frozenset[str] = frozenset()  # names the checkpointer writes with DCP

    def __init__(self, dims: ParallelDims, precision: str, device: torch.device) -> None:
        self.dims, self.precision, self.device = dims, precision, device
        self.context: Context | None = None  # dist.context_parallel: this rank's place in its group, once wrapped
        self.sequence_length: int | None = None  # where every sequence is padded to one length (a pipeline's)

    @property
    def describe(self) -> str:
        return "one process, the whole model"

    def local_batch(self, batch: Any, shift: bool) -> Any:
        """The part of a (CPU) batch this rank computes: all of it, or under context parallelism its
        chunks of every sequence (launcher/parallel/context_batches.py); `shift`: the model computes
        its own next-token loss, whose labels are then shifted before the split."""
        if self.context is None:
            return batch
        size, rank = self.context.size, self.context.rank
        return context_batches.split(batch, size, rank, shift, self.sequence_length, positions=not self.stages_take_ids)

    @property
    def counts_samples(self) -> bool:
        """Does this rank count its batch's samples in sums over the ranks (evaluation's)? One rank
        of a context-parallel group does: the others hold other tokens of the same samples."""
        return self.context is None or self.context.rank == 0

    def split_sequences(self, model: nn.Module) -> None:
        """dist.context_parallel > 1: give the model's attention this rank's group (before any wrapper)."""
        if not self.dims.enabled("cp"):
            return
        import torch.distributed as dist

        group = self.dims.sub_mesh(self.device, ("cp",)).get_group()
        self.context = Context(self.dims.cp, self.dims.coords(dist.get_rank())["cp"], group)
        context_models.apply(model, self.context)

    @property
    def gradient_mean_over(self) -> int:
        """The ranks the gradient reduction averages over (the loss weights multiply by it): none in
        one process, simulated ranks included, which sums theirs itself."""
        return 1

    def sum_over_data(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum `totals` (in place) over the ranks that read different tokens, each counted once: the
        window's valid labels, evaluation's sums. Every rank of one replica holds its replica's
        value alike (a tensor-parallel group reads one batch), so the sum over all is divided by
        the copies of each."""
        distributed.all_reduce(totals)
        copies = self.dims.copies
        if copies > 1:
            totals.div_(copies, rounding_mode=None if totals.is_floating_point() else "floor")
        return totals

    def loss_ranks(self) -> list[int]:
        """The ranks whose logged loss counts, one per replica (each of a tensor-parallel group
        computes it alike)."""
        return self.dims.loss_ranks()

    def gradient_sync(
        self,
        train_model: nn.Module,  # noqa: ARG002 - the interface: one process reduces nothing
        enabled: bool,  # noqa: ARG002
    ) -> contextlib.AbstractContextManager[None]:
        """Around a micro-step's backward: reduce the gradients over the data-parallel ranks or not
        (accumulation reduces on a window's last micro-batch only)."""
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The gradients' total 2-norm over the whole model, whatever holds which piece of it."""
        return gradients.grad_norm(params)

    def prepare(self, model: nn.Module) -> None:
        """Checks made on the built model before its weights move (a meta-device one too)."""
        if self.dims.enabled("cp"):
            context_models.check(model)  # an attention it cannot replace

    def wrap(
        self, model: nn.Module, loss_fn: LossFn | None, *, segments: int, head_chunks: int, compile_: bool
    ) -> nn.Module:
        """The module the step calls; `model` stays the unwrapped one, for saving and evaluation."""
        return wrap.wrap(model, loss_fn, segments=segments, head_chunks=head_chunks, compile_=compile_)

    def held(self, model: nn.Module, train_model: nn.Module) -> nn.Module:  # noqa: ARG002 - the interface
        """The model as this rank holds it, for the optimizer, checkpoints and evaluation: the whole
        model, or (pipeline parallelism) this rank's stages under the whole model's names."""
        return model

    def step_window(self, micro: list[Any], weights: list[Any], n_micro: int, rows: int) -> torch.Tensor:
        """Where `runs_windows`: forward and backward of a window's micro-batches (at most `n_micro`
        of at most `rows` samples, each weighted as the loop weights it); returns the sum of their
        weighted losses on the ranks whose loss counts."""
        raise NotImplementedError(f"{type(self).__name__} runs micro-batches one at a time (runs_windows is False)")

    def materialize(self, model: nn.Module, whole_state: dict[str, torch.Tensor] | None) -> None:
        """A meta-device model's real weights, once wrapped (only where `meta_init`)."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.precision, self.device)

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer, base: str | None) -> tuple[Any, Any]:
        """The model and optimizer as the checkpointer saves them (a Stateful each); frozen
        parameters left out, `base` (their fingerprint) kept instead (launcher/checkpoint/frozen.py)."""
        return (frozen.Trainable(model, base) if frozen.frozen_names(model) else model), optimizer

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, for model.pt (every rank calls it)."""
        return sharded_state.full_model_state(model, sharded=False)

    def eval_model(self, model: nn.Module, train_model: nn.Module) -> nn.Module:  # noqa: ARG002 - the interface
        return model

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients' total 2-norm to `max_norm`; returns the norm before clipping."""
        return gradients.whole(torch.nn.utils.clip_grad_norm_(params, max_norm))


class Distributed(Strategy):
    """A kind whose gradient reduction averages over the ranks that read different tokens (DDP's
    all-reduce, FSDP's reduce-scatter): the data-parallel ranks, and the context-parallel ones
    (whose gradients are of other tokens of the same samples)."""

    @property
    def gradient_mean_over(self) -> int:
        return self.dims.loss_size


class Replicated(Distributed):
    """dist.strategy=ddp on several ranks: DDP's all-reduce averages the gradients over the replicas."""

    def __init__(
        self,
        dims: ParallelDims,
        precision: str,
        device: torch.device,
        recipe: Recipe,
        comm_hook: Callable[..., Any] | None,
    ) -> None:
        super().__init__(dims, precision, device)
        self.ddp_cfg, self.comm_hook = recipe.dist.ddp, comm_hook

    @property
    def describe(self) -> str:
        return f"ddp: {self.dims.describe()}"

    def gradient_sync(self, train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return wrap.ddp_gradient_sync(train_model, enabled)

    def wrap(
        self, model: nn.Module, loss_fn: LossFn | None, *, segments: int, head_chunks: int, compile_: bool
    ) -> nn.Module:
        self.split_sequences(model)  # DDP's group is the world: data-parallel x context-parallel ranks
        replicate = lambda root: wrap.ddp(root, self.device, self.ddp_cfg, self.comm_hook)  # noqa: E731
        return wrap.wrap(
            model, loss_fn, segments=segments, head_chunks=head_chunks, compile_=compile_, distribute=replicate
        )


class Sharded(Distributed):
    """dist.strategy=fsdp/hsdp: FSDP2 on a device mesh. Its MixedPrecisionPolicy, not autocast, sets
    the compute dtype: parameters are cast once per gather, not every operator's inputs."""

    shards_in_checkpoint = CHECKPOINT_SHARDS

    def __init__(self, dims: ParallelDims, precision: str, device: torch.device, recipe: Recipe) -> None:
        super().__init__(dims, precision, device)
        self.cfg, self.strategy = recipe.dist.fsdp, recipe.dist.strategy
        self.meta_init = recipe.dist.fsdp.meta_init
        self.tp_plan = recipe.dist.tp_plan  # None: the model's own (tensor.plan_of)
        # FSDP imports it (~100 MB) on first use: imported now, it is not counted as the model's memory
        importlib.import_module("torch._dynamo")

    @property
    def describe(self) -> str:
        tp = f" x tensor parallel {self.dims.tp}" if self.dims.enabled("tp") else ""
        return f"{self.strategy}{tp}: {self.dims.describe()}"

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        sharding.units(model, self.cfg.units)  # a wrong class name or a tied unit fails at any world size
        frozen_base = sorted(frozen.frozen_names(model))
        if self.meta_init and frozen_base:
            # checkpoints leave frozen parameters out (they are rebuilt from their source), but a
            # meta-device build draws them per shard: at another layout they would come back different
            raise RecipeError(
                "dist.fsdp.meta_init",
                f"the model has {len(frozen_base)} frozen parameters ({frozen_base[0]}, ...: a LoRA base?), which "
                "a meta-device build draws afresh per shard and checkpoints leave out, so a resume at another "
                "layout could not rebuild them; set dist.fsdp.meta_init=false",
            )
        if self.dims.enabled("tp"):
            tensor.check(model, tensor.plan_of(model, self.tp_plan), self.dims.tp)

    def wrap(
        self, model: nn.Module, loss_fn: LossFn | None, *, segments: int, head_chunks: int, compile_: bool
    ) -> nn.Module:
        self.split_sequences(model)
        if self.dims.enabled("tp"):  # first: FSDP then shards the tensor-parallel DTensors over the data-parallel ranks
            tensor.apply(model, tensor.plan_of(model, self.tp_plan), self.dims.sub_mesh(self.device, ("tp",)))
        dp_mesh = self.dims.data_mesh(self.device)
        shard = lambda root: sharding.shard(root, model, self.cfg, dp_mesh, self.precision, head_chunks)  # noqa: E731
        return wrap.wrap(
            model, loss_fn, segments=segments, head_chunks=head_chunks, compile_=compile_, distribute=shard
        )

    def gradient_sync(self, train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return wrap.fsdp_gradient_sync(train_model, enabled)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        if not self.dims.enabled("tp"):
            return super().clip_grad_norm(params, max_norm)
        return gradients.clip_norm_(list(params), max_norm)  # gradients on two meshes: torch's cannot stack them

    def materialize(self, model: nn.Module, whole_state: dict[str, torch.Tensor] | None) -> None:
        if not self.meta_init:
            return
        sharding.materialize(model, self.device)
        if whole_state is not None:  # a whole (ddp) checkpoint: every rank keeps its own pieces
            sharded_state.load_whole_model(model, whole_state)
        else:  # drawn per rank: the copies of one piece made equal
            sharding.agree_replicas(model, self.dims.mesh(self.device))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer, base: str | None) -> tuple[Any, Any]:
        # by parameter name, as DCP saves them: each rank its shards
        return sharded_state.ModelState(model, base), sharded_state.OptimizerState(model, optimizer)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # gathering tensor-parallel shards, DTensor warns on every rank that two all-gathers are
        # "suboptimal": true, and irrelevant for a one-time copy to model.pt
        quiet = logging.getLogger("torch.distributed.tensor._redistribute")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return sharded_state.full_model_state(model, sharded=True)
        finally:
            quiet.setLevel(level)

    def eval_model(self, model: nn.Module, train_model: nn.Module) -> nn.Module:
        return wrap.eval_model(model, train_model)


class WholeOfSharded(Strategy):
    """An fsdp/hsdp recipe without a process group (a plain single process, simulated ranks): the
    model trains whole, and its sharding units are still checked, so a wrong class name fails at
    any world size."""

    def __init__(self, dims: ParallelDims, precision: str, device: torch.device, recipe: Recipe) -> None:
        super().__init__(dims, precision, device)
        self.cfg = recipe.dist.fsdp

    def prepare(self, model: nn.Module) -> None:
        sharding.units(model, self.cfg.units)
