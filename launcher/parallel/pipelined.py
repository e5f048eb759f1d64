"""dist.pipeline_parallel > 1: the strategy that splits the model into pipeline stages (the outermost
dimension of the mesh), each stage sharded or replicated over the data-parallel ranks with FSDP2
(replicating under ddp, as ddp with tensor parallelism does), its layers split by the tensor plan
first where dist.tensor_parallel > 1.

A rank holds its stages only, under the whole model's parameter names (`held`: one module over
them), so checkpoints are DCP shards by name that resume at any layout. The loop hands it whole
windows (`runs_windows`): torch's schedule runs the micro-batches, each weighted as the loop
weights them (launcher/parallel/pipeline.py's WeightedLoss), padded to one shape for the run
(pipeline_batches.py). The gradient norm adds every stage's squares over the pipeline group."""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.checkpoint import sharded_state
from launcher.errors import RecipeError
from launcher.parallel import (
    context_batches,
    gradients,
    pipeline,
    pipeline_batches,
    pipeline_eval,
    pipeline_split,
    sharding,
    tensor,
)
from launcher.parallel.dims import ParallelDims
from launcher.parallel.strategy import CHECKPOINT_SHARDS, Distributed

if TYPE_CHECKING:
    from launcher.data.batches import LossFn
    from launcher.recipe.schema import Recipe


def check(recipe: Recipe) -> None:
    """What pipeline parallelism refuses before any model exists (at `launcher check` too)."""
    if recipe.dist.pipeline_parallel == 1:
        return
    cfg = recipe.dist.pipeline
    pipeline.check_torch(cfg.schedule)
    pipeline.check_stages_per_rank(cfg.schedule, cfg.stages_per_rank)
    ac = recipe.train.activation_checkpointing
    refused = [
        (recipe.train.loss_mean_over == "samples", "train.loss_mean_over", "samples", "tokens"),
        (recipe.dist.fsdp.meta_init, "dist.fsdp.meta_init", "true", "false"),
        (recipe.train.compile, "train.compile", "true", "false"),
        (ac.segments not in (0, None), "train.activation_checkpointing.segments", str(ac.segments), "0"),
        (ac.head_chunks > 0, "train.activation_checkpointing.head_chunks", str(ac.head_chunks), "0"),
    ]
    for wrong, key, value, fix in refused:
        if wrong:
            why = {
                "train.loss_mean_over": "windows are padded to one shape, whose padded rows a mean over samples counts",
                "dist.fsdp.meta_init": "the stages are split from the whole model, built and initialised first",
            }.get(key, "it runs the whole model in one module, which the stages split")
            raise RecipeError(key, f"{value} is not supported with dist.pipeline_parallel > 1 ({why}); set {key}={fix}")


class Pipelined(Distributed):
    """The model's stages on this rank, under torch's schedule."""

    shards_in_checkpoint = CHECKPOINT_SHARDS
    runs_windows = True
    holds_whole_model = False
    stages_take_ids = True

    def __init__(self, dims: ParallelDims, precision: str, device: torch.device, recipe: Recipe) -> None:
        super().__init__(dims, precision, device)
        self.cfg, self.fsdp_cfg, self.tp_plan = recipe.dist.pipeline, recipe.dist.fsdp, recipe.dist.tp_plan
        self.strategy = recipe.dist.strategy
        self.pad_id = int((recipe.data.collate or {}).get("pad_id", 0))
        self.pp_rank = dims.coords(_rank())["pp"]
        self.stages: list[nn.Module] = []  # this rank's stage modules (wrapped)
        self.layers: list[range] = []  # the blocks of every stage
        self.ids: list[int] = []  # the stages this rank runs
        self.loss: pipeline.WeightedLoss | None = None
        self.schedule: Any = None
        self.length = 0  # every micro-batch's tokens, for the run (the model's context)
        self.sharded = dims.loss_size > 1  # gradients to reduce over data-parallel (and context) ranks
        self.whole_order: list[str] | None = None  # the whole model's trainable parameter names, in order
        if self.sharded:
            importlib.import_module("torch._dynamo")  # as Sharded: FSDP imports it on first use

    @property
    def describe(self) -> str:
        return f"pipeline {self.cfg.schedule} x {self.strategy}: {self.dims.describe()}"

    def prepare(self, model: nn.Module) -> None:
        self.layers = pipeline.stage_layers(
            pipeline_split.n_blocks(model), self.dims.pp, self.cfg.stages_per_rank, self.cfg.split
        )
        if self.dims.enabled("tp"):
            tensor.check(model, tensor.plan_of(model, self.tp_plan), self.dims.tp)
        if self.dims.enabled("cp"):
            super().prepare(model)  # attention that can be replaced
            context_batches.check_length(_context_length(model), self.dims.cp)

    def wrap(
        self, model: nn.Module, loss_fn: LossFn | None, *, segments: int, head_chunks: int, compile_: bool
    ) -> nn.Module:
        del segments, head_chunks, compile_  # refused under pipelining (check)
        self.prepare(model)
        self.ids = pipeline.stage_ids(self.pp_rank, self.dims.pp, self.cfg.stages_per_rank, self.cfg.schedule)
        self.split_sequences(model)  # before the split: the stages' modules hold the context group
        self.sequence_length = _context_length(model)  # every sequence padded to it, then split over cp
        self.length = self.sequence_length // self.dims.cp  # this rank's part of each
        # a whole (ddp) checkpoint's optimizer state is positional over the whole model's parameters
        self.whole_order = [name for name, p in model.named_parameters() if p.requires_grad]
        modules = pipeline_split.split_model(model, self.layers, self.ids)
        for stage in modules:
            if self.dims.enabled("tp"):  # first: FSDP then shards the tensor-parallel DTensors
                tensor.apply(stage, tensor.plan_of(stage, self.tp_plan), self.dims.sub_mesh(self.device, ("tp",)))
            if self.sharded:
                dp_mesh = self.dims.data_mesh(self.device)
                sharding.shard(stage, stage, self.fsdp_cfg, dp_mesh, self.precision, 0, forward_method=None)
        self.stages = modules
        # a rank's part of a sequence comes with its labels shifted over the whole (context_batches.py)
        own = pipeline_batches.aligned_lm_loss if self.context is not None else pipeline_batches.causal_lm_loss
        self.loss = pipeline.WeightedLoss(loss_fn or own)
        return pipeline_split.held(modules)

    def held(self, model: nn.Module, train_model: nn.Module) -> nn.Module:  # noqa: ARG002 - the interface
        return train_model  # the stages' parameters under the whole model's names

    def step_window(self, micro: list[Any], weights: list[Any], n_micro: int, rows: int) -> torch.Tensor:
        """Forward and backward of a window's micro-batches through the schedule; returns the sum of
        their weighted mean losses on the last stage (0 elsewhere)."""
        assert self.loss is not None, "wrap first"
        if self.schedule is None:  # once: the stages infer their shapes at the first step
            group = self.dims.sub_mesh(self.device, ("pp",)).get_group()
            stages = pipeline.build_stages(self.stages, self.ids, len(self.layers), group, self.device)
            self.schedule = pipeline.build_schedule(stages, self.cfg.schedule, n_micro, self.loss)
        batch, weights = pipeline_batches.stack_window(micro, weights, n_micro, rows, self.length, self.pad_id)
        inputs, target = pipeline_batches.schedule_inputs(batch, n_micro)
        inputs, target = inputs.to(self.device), target.to(self.device)
        first, last = 0 in self.ids, len(self.layers) - 1 in self.ids
        losses: list[torch.Tensor] = []
        self.loss.begin(weights)
        with self.autocast():
            self.schedule.step(*([inputs] if first else []), target=target if last else None, losses=losses)
        return torch.stack(losses).sum().detach() if losses else torch.zeros((), device=self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.sharded else super().autocast()

    def loss_ranks(self) -> list[int]:
        """One rank of each tensor-parallel group on the pipeline rank holding the last stage (rank 0
        under the V schedules, which place the first and the last stage together)."""
        last = pipeline_eval.stage_ranks(self.dims.pp, self.cfg.stages_per_rank, self.cfg.schedule)[-1]
        return self.dims.ranks_where(tp=0, pp=last)

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        return pipeline.grad_norm(list(params), self.dims.sub_mesh(self.device, ("pp",)).get_group())

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return gradients.clip_norm_(list(params), max_norm, norm=self.grad_norm(params))

    def checkpointed(self, model: nn.Module, optimizer: torch.optim.Optimizer, base: str | None) -> tuple[Any, Any]:
        state = sharded_state.OptimizerState(model, optimizer, self.whole_order)
        return sharded_state.ModelState(model, base), state

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every stage's weights, gathered into the first rank of each pipeline (rank 0 saves them)."""
        import torch.distributed as dist

        split = self.sharded or self.dims.enabled("tp")
        mine = sharded_state.full_model_state(model, sharded=split, every_rank=True)
        group = self.dims.sub_mesh(self.device, ("pp",)).get_group()
        parts: list[Any] = [None] * self.dims.pp
        dist.all_gather_object(parts, mine, group=group)
        return {k: v for part in parts for k, v in part.items()}

    def eval_model(self, model: nn.Module, train_model: nn.Module) -> nn.Module:  # noqa: ARG002 - the interface
        ranks = pipeline_eval.stage_ranks(self.dims.pp, self.cfg.stages_per_rank, self.cfg.schedule)
        group = self.dims.sub_mesh(self.device, ("pp",)).get_group()
        return pipeline_eval.Outputs(self.stages, self.ids, ranks, group)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _context_length(model: nn.Module) -> int:
    """The longest sequence the model takes: every micro-batch is padded to it (one shape for the run)."""
    config = getattr(model, "config", None)
    for name in ("max_positions", "seq_len"):
        if isinstance(getattr(model, name, None), int):
            return int(getattr(model, name))
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise RecipeError(
        "dist.pipeline_parallel",
        f"{type(model).__name__} does not say its longest sequence, which pipeline stages need",
    )


def plan_rows(recipe: Recipe, model: nn.Module, dims: ParallelDims, n_micro: int) -> list[tuple[str, str]]:
    """`launcher check`'s lines for pipeline parallelism: the schedule and its bubble, then each
    stage's layers, its rank and its state per rank (weights, gradients and optimizer state, sharded
    over the stage's data-parallel ranks under fsdp and hsdp)."""
    from launcher.parallel import memory

    cfg = recipe.dist.pipeline
    layers = pipeline.stage_layers(pipeline_split.n_blocks(model), dims.pp, cfg.stages_per_rank, cfg.split)
    pipeline.check_micro_batches(cfg.schedule, dims.pp, cfg.stages_per_rank, n_micro)
    bubble = pipeline.bubble_fraction(cfg.schedule, dims.pp, cfg.stages_per_rank, n_micro)
    ranks = pipeline_eval.stage_ranks(dims.pp, cfg.stages_per_rank, cfg.schedule)
    per_rank = f", {cfg.stages_per_rank} stages per rank" if cfg.stages_per_rank > 1 else ""
    rows = [("pipeline", f"{cfg.schedule}{per_rank}, {n_micro} micro-batches a step, bubble {bubble:.0%} of a step")]
    moments = memory.optimizer_moments(recipe.optimizer)
    shard = 1 if recipe.dist.strategy == "ddp" else (dims.dp_shard if dims.hybrid else dims.dp_size)
    for s, blocks in enumerate(layers):
        (stage,) = pipeline_split.split_model(model, layers, [s])
        held = [name for name in ("embeddings",) if s == 0]
        held.append(f"blocks {blocks.start}-{blocks.stop - 1}" if len(blocks) > 1 else f"block {blocks.start}")
        if len(blocks) == 0:
            held.pop()
        if s == len(layers) - 1:
            held.append("norm, head")
        state = memory.state_plan(stage, moments, shard, dims.tp)
        rows.append((f"stage {s} (pipeline rank {ranks[s]})", f"{', '.join(held)}: {_mib(state.total)} per rank"))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"
