"""Recipe loading: YAML and dotted overrides (recipe_yaml.py) -> a validated, frozen `Recipe`.

Every section is a strict pydantic model: unknown keys are errors (with a did-you-mean), types are
not coerced ("10" is not an int), and every error becomes a one-line `RecipeError` naming the key.
Component sections (`model`, `loss`, ...) are dicts with `_component_` plus keyword arguments; their
arguments are checked against the component's signature in `components.check`.
"""

from __future__ import annotations

import math
import re
import signal
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launcher.checkpoint.rundir import RunDir
from launcher.errors import RecipeError
from launcher.recipe.translate import suggest, to_recipe_error
from launcher.recipe.yaml_io import apply_overrides, read_yaml

Component = dict[str, Any]
# counts stay within a C int: larger values are typos that would overflow deep inside torch
MAX_COUNT = 2**31 - 1
PosInt = typing.Annotated[int, Field(gt=0, le=MAX_COUNT)]
NonNegInt = typing.Annotated[int, Field(ge=0, le=MAX_COUNT)]
PosFloat = typing.Annotated[float, Field(gt=0)]
# seeds feed torch (uint64), numpy (mod 2**32) and seed + rank: any non-negative int64 fits all three
Seed = typing.Annotated[int, Field(ge=0, lt=2**63 - 2**20)]
# timedelta and the process group's timeout overflow long before 1e300; a month is plenty for one collective
TIMEOUT_MAX_S = 30 * 24 * 3600.0


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are never meaningful settings, and fail later in odd places
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Data(_Section):
    train: Component
    val: Component | None = None
    batch_size: PosInt  # per-rank micro-batch
    fit_batch_size: bool = False  # batch_size is the largest micro-batch: use the largest that splits the global batch
    seed: Seed | None = None  # the sampler's shuffling order; None: the recipe's seed
    num_workers: NonNegInt = 0
    shuffle: bool = True
    drop_last: bool = False
    pin_memory: bool | None = None  # None: on when the device is CUDA
    prefetch_factor: PosInt | None = None  # None: torch's default (2) when num_workers > 0
    collate: Component | None = None  # builds a batch from samples (padding, packing); None: torch's default


class ActivationCheckpointing(_Section):
    segments: NonNegInt | Literal["auto"] = 0  # auto: the fewest that fit max_memory_gib, found by probing
    head_chunks: NonNegInt = 0  # > 0: the last module and the loss run apart, in this many checkpointed slices
    modules: list[str] = []  # class names: every such module recomputes its forward in the backward (any model)
    max_memory_gib: PosFloat | None = None  # the budget for auto; None: 90% of the GPU


class EarlyStopping(_Section):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: PosInt = 3
    min_delta: typing.Annotated[float, Field(ge=0)] = 0.0


class Train(_Section):
    epochs: PosInt | None = None
    max_steps: PosInt | None = None
    global_batch_size: PosInt | None = None  # None: batch_size x world_size
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip_norm: PosFloat | None = None
    grad_clip_value: PosFloat | None = None
    warmup_steps: NonNegInt = 0
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing()
    eval_every_steps: PosInt | None = None  # None: after each epoch
    eval_max_batches: PosInt | None = None  # None: the whole validation set; else this many batches per rank
    early_stopping: EarlyStopping | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: PosInt = 10  # with on_nonfinite=skip: this many non-finite steps in a row stop the run
    compile: bool = False  # torch.compile the model and the loss together
    # what each optimizer step's loss is the mean over: auto is tokens when the model computes its
    # own loss (no loss component), else samples. tokens: labels that are not -100, over the window
    loss_mean_over: Literal["auto", "samples", "tokens"] = "auto"
    channels_last: bool = False  # NHWC memory format for image models (faster convolutions on GPUs)


class DDP(_Section):
    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_as_bucket_view: bool = True
    bucket_cap_mb: PosFloat | None = None  # None: DDP's default (25)
    comm_hook: Component | None = None


class FSDP(_Section):
    """dist.strategy fsdp/hsdp (FSDP2, torch >= 2.6). docs/sharding.md says when to pick which."""

    units: Literal["auto"] | list[str] = (
        "auto"  # sharding units: class names, or auto (Sequential children, repeated blocks)
    )
    reshard_after_forward: bool = True  # true: ZeRO-3 memory; false: keep gathered weights until backward (ZeRO-2-like)
    cpu_offload: bool = False  # parameters, gradients and optimizer state live in host memory
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # gradients are reduced in this dtype
    shard_group_size: PosInt | None = None  # hsdp: ranks per shard group (replicated across groups); None: per node
    # build on the meta device, shard, then initialise (or load) each rank's shards: no rank holds the whole model
    meta_init: bool = False


class Pipeline(_Section):
    """dist.pipeline_parallel > 1 (torch >= 2.8). docs/parallelism.md says when to use it."""

    # gpipe | 1f1b | interleaved_1f1b (stages_per_rank >= 2); interleaved_zb, zbv, dualpipev need torch 2.13
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"] = "1f1b"
    stages_per_rank: PosInt = 1  # stages each pipeline rank runs (interleaved and V schedules: 2 or more)
    split: list[NonNegInt] | None = None  # the first block of stages 1, 2, ...; None: the blocks split evenly


class Dist(_Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: typing.Annotated[float, Field(gt=0, le=TIMEOUT_MAX_S)] = 600.0
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    # ranks each layer is split over (tensor parallelism, torch >= 2.6); the data-parallel ranks are
    # the world size / tensor_parallel, and the ranks of one group read the same batch
    tensor_parallel: PosInt = 1
    # the tensor-parallel plan, {module-name pattern: colwise | rowwise}; None: the model's own
    tp_plan: dict[str, Literal["colwise", "rowwise"]] | None = None
    # pipeline stages the model's layers are split over (outermost on the mesh, torch >= 2.8); the
    # data-parallel ranks are the world size / (tensor_parallel x pipeline_parallel)
    pipeline_parallel: PosInt = 1
    pipeline: Pipeline = Pipeline()
    # ranks every sample's sequence is split over (context parallelism, torch >= 2.6): each holds a
    # head and a tail chunk of it, and attention gathers the keys and values of all of them
    context_parallel: PosInt = 1
    ddp: DDP = DDP()
    fsdp: FSDP = FSDP()


class Checkpoint(_Section):
    dir: str | None = None  # None: <run.dir>/checkpoints
    every_n_steps: PosInt | None = None  # None: only at the end of training and on preemption
    keep_last: PosInt = 2
    resume: str = "auto"  # auto | none | <path>
    preempt_signal: str = "SIGUSR1"  # besides SIGTERM
    requeue_exit_code: typing.Annotated[int, Field(ge=3, le=125)] = 75  # EX_TEMPFAIL
    # periodic saves: copied to host memory, then written by a thread while training goes on
    # (one more host copy of the state; the final and preemption saves stay synchronous)
    async_save: bool = False


class Wandb(_Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with an API key, else offline
    project: str | None = None  # None: the recipe's name
    entity: str | None = None
    name: str | None = None  # None: the recipe's name
    group: str | None = None
    tags: list[str] = []


class Profile(_Section):
    start_step: NonNegInt = 10  # optimizer steps before the profiler starts (it then warms up for one)
    steps: PosInt = 5  # optimizer steps recorded
    ranks: list[NonNegInt] = [0]  # which ranks write a trace
    memory: bool = False  # also record tensor allocations (profile_memory)
    with_stack: bool = False  # also record Python stacks (larger traces)


class Log(_Section):
    every_n_steps: PosInt = 10
    wandb: Wandb | None = None  # None: no wandb
    tensorboard: bool = False
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal, lines otherwise
    profile: Profile | None = None  # None: no profiler; see launcher/observe/profiling.py


class Run(_Section):
    dir: str | None = None  # None: runs/<name>
    overwrite: bool = False


class Recipe(_Section):
    name: str
    seed: Seed = 0
    model: Component
    data: Data
    loss: Component | None = None  # None: the model computes its own (transformers models given labels)
    optimizer: Component
    scheduler: Component | None = None
    train: Train
    dist: Dist = Dist()
    checkpoint: Checkpoint = Checkpoint()
    log: Log = Log()
    run: Run = Run()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def layout(self) -> RunDir:
        """The run directory's files, checks and lock."""
        return RunDir(self.run_dir, self.checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, with secret-looking values (api_key, token, password, ...) redacted:
        this is what config.yaml, checkpoints, wandb and `launcher check` show."""
        return redact(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# "token" only as a key's last word (token, hf_token, access-token): tokenizer, tokenizer_revision and
# pad_token_id name no secret, and hiding them would leave a run unable to say what it trained with
_SECRET = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|(^|[_-])token$)", re.I)
REDACTED = "***"


def redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and _SECRET.search(key) and value not in (None, "", False):
        return REDACTED
    return value


# Where each component section lives, and how many leading positional arguments the launcher
# passes at build time (the parameters to an optimizer, the optimizer to a scheduler, ...).
COMPONENT_KEYS: dict[str, int] = {
    "model": 0,
    "model.peft": 0,  # adapters (any peft config, e.g. peft.LoraConfig) around the model
    "data.train": 0,
    "data.val": 0,
    "data.collate": 0,
    "loss": 0,
    "optimizer": 1,
    "scheduler": 1,
    "dist.ddp.comm_hook": 2,
}


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    raw = apply_overrides(read_yaml(path), list(overrides))
    return validate(raw)


def validate(raw: dict[str, Any]) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise to_recipe_error(e, Recipe) from None
    _check_rules(recipe)
    return recipe


def _check_rules(r: Recipe) -> None:
    """Cross-field rules that need no world size and no data (those live in plan.py)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.name):
        raise RecipeError("name", f"{r.name!r} must be letters, digits, '.', '_' or '-' (it names the run directory)")
    _check_train_rules(r)
    _check_components(r)
    if r.dist.fsdp.meta_init and r.model.get("pretrained"):
        # a meta-device build initialises every shard afresh: the pretrained weights would be dropped
        raise RecipeError(
            "dist.fsdp.meta_init",
            f"cannot load model.pretrained={r.model['pretrained']} into a meta-device build (its weights would be "
            "replaced by a fresh initialisation); set dist.fsdp.meta_init=false",
        )
    if r.dist.tensor_parallel > 1 and r.model.get("peft"):
        # peft wraps each target Linear in a LoRA layer, which the tensor-parallel plan cannot split
        raise RecipeError(
            "dist.tensor_parallel",
            f"{r.dist.tensor_parallel} with model.peft (LoRA) is not supported: the plan splits plain Linear "
            "layers and peft wraps them; set dist.tensor_parallel=1 (dist.strategy=fsdp shards the frozen base)",
        )
    sig = r.checkpoint.preempt_signal
    name = sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP", "SIGINT"):
        raise RecipeError(
            "checkpoint.preempt_signal",
            f"{sig!r} is not a signal the launcher can catch; use e.g. SIGUSR1, SIGUSR2 or SIGTERM",
        )


def _check_train_rules(r: Recipe) -> None:
    t = r.train
    if t.epochs is None and t.max_steps is None:
        raise RecipeError("train.epochs", "set train.epochs or train.max_steps (or both: whichever ends first)")
    if t.grad_clip_norm is not None and t.grad_clip_value is not None:
        raise RecipeError("train.grad_clip_value", "set either train.grad_clip_norm or train.grad_clip_value, not both")
    ac = t.activation_checkpointing
    if ac.modules and (ac.segments or ac.head_chunks):
        raise RecipeError(
            "train.activation_checkpointing.modules",
            "checkpoint either by module class or by segments/head_chunks of an nn.Sequential, not both",
        )
    if r.loss is None and (ac.segments or ac.head_chunks):
        raise RecipeError(
            "train.activation_checkpointing.segments",
            "segments and head_chunks need a loss component (the model computes its own loss here); "
            "checkpoint blocks by class with activation_checkpointing.modules",
        )
    if t.eval_every_steps is not None and r.data.val is None:
        raise RecipeError(
            "train.eval_every_steps", "evaluation needs data.val; add a validation dataset or remove this key"
        )
    if t.early_stopping is not None:
        metric = t.early_stopping.metric
        if metric.startswith("val_") and r.data.val is None:
            raise RecipeError("train.early_stopping.metric", f"{metric} needs data.val; add a validation dataset")
        known = ("val_loss", "val_accuracy")
        if metric not in known:
            raise RecipeError(
                "train.early_stopping.metric",
                f"unknown metric {metric!r}{suggest(metric, known)} (one of {', '.join(known)})",
            )


def _check_components(r: Recipe) -> None:
    for key in COMPONENT_KEYS:
        spec = get_key(r, key)
        if spec is None:
            continue
        target = spec.get("_component_")
        if target is None:
            raise RecipeError(f"{key}._component_", "missing; name what to build, e.g. _component_: torch.optim.AdamW")
        if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", target):
            raise RecipeError(f"{key}._component_", f"{target!r} is not a dotted path like torch.optim.AdamW")
    lr = r.optimizer.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0):
        raise RecipeError("optimizer.lr", f"expected a non-negative number, got {lr!r}")
    for key in COMPONENT_KEYS:
        spec = get_key(r, key)
        if spec is not None:
            # an optimizer's numbers (lr, betas, eps, weight_decay) must be finite; NaN is never an argument
            _check_finite(spec, key, allow_inf=key != "optimizer")


def _check_finite(value: Any, key: str, allow_inf: bool) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}", allow_inf)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]", allow_inf)
    elif isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
        raise RecipeError(key, f"expected a finite number, got {value!r}")


def get_key(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
        if node is None:
            return None
    return node


# keys of a component's section that the launcher reads itself, not passed to the component
RESERVED = {"model": ("peft",)}


def component_spec(recipe: Recipe, key: str) -> dict[str, Any] | None:
    """The component at `key` as it is built: its section less the keys the launcher keeps (model.peft)."""
    spec = get_key(recipe, key)
    if spec is None:
        return None
    return {k: v for k, v in spec.items() if k not in RESERVED.get(key, ())}
