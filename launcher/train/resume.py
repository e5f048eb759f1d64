"""What a run saves in a checkpoint, and which recipe may continue one, exactly.

Saved at an optimizer-step boundary, by name (launcher/checkpoint/checkpointer.py does the saving): the
unwrapped model, optimizer, scheduler and GradScaler states, the TrainState (step, epoch, step
within the epoch, early stopping), the log window since the last log row, every rank's RNG streams,
the ids of external loggers, and as metadata the recipe and the batch arithmetic. The data
position needs nothing more: the sampler's permutation is a function of (seed, epoch), and the
step within the epoch says how many of this rank's samples to skip (ShardSampler.set_start), so
nothing already trained on is reloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launcher.checkpoint import checkpointer, frozen, sharded_state, step_dirs
from launcher.checkpoint.checkpointer import Stateful
from launcher.checkpoint.sharded_state import ModelState, OptimizerState
from launcher.cluster import distributed
from launcher.cluster.distributed import Session
from launcher.data.plan import Plan
from launcher.errors import RecipeError, TrainingError
from launcher.observe.logs import log
from launcher.recipe.schema import REDACTED, Recipe
from launcher.rng import RankStreams
from launcher.train.loop_state import LogWindow, Trainer, TrainState

if TYPE_CHECKING:  # annotations only: the loop calls into this module
    from torch.optim.lr_scheduler import LRScheduler

    from launcher.observe.metrics import LoggerIds


def gather_loss_sums(window: LogWindow, session: Session, loss_ranks: list[int] | None = None) -> torch.Tensor:
    """Every data-parallel replica's per-step loss sums since the last log ([replicas, steps], on
    the CPU). Syncs. `loss_ranks`: the ranks whose sums count, one per replica (the strategy's:
    a tensor-parallel group's ranks compute one loss alike); None: all."""
    mine = window.loss_sums[: window.steps].detach()
    if distributed.is_initialized() and session.world_size > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(mine) for _ in range(session.world_size)]
        dist.all_gather(gathered, mine.contiguous())
        return torch.stack(gathered if loss_ranks is None else [gathered[r] for r in loss_ranks]).cpu()
    return mine.cpu().unsqueeze(0)


def check_finite(t: Trainer) -> torch.Tensor:
    """`gather_loss_sums`, checked (`raise_if_nonfinite`): at log steps. Saving checks too, in
    LogWindowState, so that nothing corrupt is written."""
    per_rank = gather_loss_sums(t.window, t.session, t.modules.strategy.loss_ranks())
    raise_if_nonfinite(per_rank, t.window, t.state, t.recipe.train.on_nonfinite)
    return per_rank


def raise_if_nonfinite(per_rank: torch.Tensor, window: LogWindow, state: TrainState, on_nonfinite: str) -> None:
    """With on_nonfinite=stop, raise if any of the window's loss sums is non-finite, naming the
    first such step and its rank(s)."""
    if on_nonfinite == "stop" and not torch.isfinite(per_rank).all():
        bad = ~torch.isfinite(per_rank)
        first = int(bad.any(dim=0).nonzero()[0])
        step = state.step - window.steps + first + 1
        ranks = ", ".join(str(r) for r in bad[:, first].nonzero().flatten().tolist())
        last = state.last_checkpoint_step
        kept = f"the last checkpoint (step {last}) is intact" if last >= 0 else "no checkpoint was written"
        raise TrainingError(
            f"non-finite loss at step {step} on rank {ranks} (train.on_nonfinite=stop); "
            f"nothing after it was saved and {kept}"
        )


class LogWindowState:
    """The log steps since the last log row, summed over ranks (Stateful): a resumed run's first row
    then averages over the same steps as the uninterrupted run's. Saving is a collective, and checks
    the sums it gathers (`raise_if_nonfinite`) before anything is written."""

    def __init__(
        self,
        window: LogWindow,
        session: Session,
        state: TrainState,
        on_nonfinite: str,
        loss_ranks: list[int] | None = None,
    ) -> None:
        self.window, self.session, self.state, self.on_nonfinite = window, session, state, on_nonfinite
        self.loss_ranks = loss_ranks  # the ranks whose loss counts, one per replica (the strategy's)

    def state_dict(self) -> dict[str, Any]:
        per_rank = gather_loss_sums(self.window, self.session, self.loss_ranks)
        raise_if_nonfinite(per_rank, self.window, self.state, self.on_nonfinite)
        return {"loss_sums": per_rank.sum(0), "samples": self.window.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        steps = len(state_dict["loss_sums"])
        if steps <= len(self.window.loss_sums):  # else log.every_n_steps shrank: start a fresh window
            # on one rank only, so that the log step's sum over ranks counts it once
            self.window.restore(state_dict["loss_sums"] if self.session.is_main else None, steps, state_dict["samples"])


def saved_objects(
    model: Stateful,
    optimizer: Stateful,
    scheduler: LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    window: LogWindow,
    session: Session,
    logger_ids: LoggerIds,
    on_nonfinite: str,
    loss_ranks: list[int] | None = None,
) -> dict[str, Stateful | None]:
    """What a checkpoint holds, by name. The model and optimizer as the strategy saves them
    (`Strategy.checkpointed`): the user's unwrapped model, or under FSDP by parameter name, as DCP
    saves them (each rank its shards)."""
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "train_state": state,
        "log_window": LogWindowState(window, session, state, on_nonfinite, loss_ranks),
        "rng": RankStreams(session.rank, session.control),
        "loggers": logger_ids,
    }


def metadata(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """Saved beside the objects, read back only to check that a recipe may continue the run."""
    return {
        "world_size": plan.world_size,
        "recipe": recipe.to_dict(),
        "plan": {
            "global_batch": plan.global_batch,
            "train_samples": plan.train_samples,
            "steps_per_epoch": plan.steps_per_epoch,
        },
    }


def save_checkpoint(t: Trainer, blocking: bool = True) -> Path | None:
    """Every rank calls this at the same step; the main process writes. Returns the path there
    (None where it is written in the background: `blocking=False` with checkpoint.async_save).
    A blocking save returns once every checkpoint is on disk, this step's or an earlier one's."""
    s = t.state
    if s.last_checkpoint_step == s.step:
        if blocking:
            t.control.checkpointer.wait()  # this step's checkpoint may still be being written
        return None
    path = t.control.checkpointer.save(
        s.step,
        t.control.saved,
        metadata(t.recipe, t.data.plan),
        # the model's shapes: a recipe for another model is refused before any worker starts
        summary={
            "global_batch": t.data.plan.global_batch,
            "shapes": t.modules.shapes,
            "peft": t.recipe.model.get("peft"),  # the adapters' config: a resume that changes it is refused
        },
        blocking=blocking,
    )
    # after: a non-finite loss found while saving names the previous checkpoint as the intact one
    # (the saved TrainState's own last_checkpoint_step is set to its step when it is loaded)
    s.last_checkpoint_step = s.step
    if path is not None:
        log.info(f"checkpoint: {path}")
    return path


def load_for_resume(
    path: Path, model: torch.nn.Module, recipe: Recipe, plan: Plan, base: str | None, load_weights: bool = True
) -> dict[str, Any]:
    """Read a checkpoint, check that this recipe can continue it exactly, and put its weights in
    `model` (before wrapping; not `load_weights`: a meta-device model gets them once sharded).
    `base`: the fingerprint of the model's frozen parameters as built, checked against the saved one."""
    payload = checkpointer.read(path)
    check_compatible(payload, path, recipe, plan)
    if checkpointer.in_shards(payload, "model"):  # loaded into the shards once they exist (restore)
        saved_shapes = sharded_state.saved_shapes(path / step_dirs.SHARDS, "model")
        check_model_matches(
            checkpointed_state(model), {k: torch.empty(v, device="meta") for k, v in saved_shapes.items()}, path
        )
        return payload
    frozen.check_base(payload["model"].get(frozen.BASE_KEY), base, str(path))
    check_model_matches(checkpointed_state(model), payload["model"], path)
    if load_weights:
        checkpointer.restore(payload, {"model": frozen.Trainable(model, base, str(path))})
    return payload


def checkpointed_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint holds of the model: its state less the frozen parameters."""
    return frozen.trainable_state(model.state_dict(), frozen.frozen_names(model))


_START_OVER = "or start over with checkpoint.resume=none run.overwrite=true"


def check_compatible(payload: Mapping[str, Any], path: Path, recipe: Recipe, plan: Plan) -> None:
    """One line naming the key, for a recipe that cannot continue this checkpoint's maths."""
    saved = payload.get("plan") or _plan_of_old_checkpoint(payload)
    check_global_batch(saved["global_batch"], plan.global_batch, path)
    state = payload["train_state"]
    if plan.streamed:
        return check_components(payload, path, recipe)  # a stream has no epoch to fit, no size to compare
    if state["step_in_epoch"] >= plan.steps_per_epoch:
        raise RecipeError(
            "data.train",
            f"{path} stopped at step {state['step_in_epoch']} of an epoch, but an epoch now "
            f"has {plan.steps_per_epoch} steps ({plan.train_samples} samples, data.drop_last="
            f"{str(plan.drop_last).lower()}); resume with the data it was trained on, {_START_OVER}",
        )
    if saved["train_samples"] != plan.train_samples:
        log.warning(
            f"{path} was trained on {saved['train_samples']} samples and resumes on {plan.train_samples}: "
            "the data order from here differs from the uninterrupted run's"
        )
    check_components(payload, path, recipe)


def check_components(payload: Mapping[str, Any], path: Path, recipe: Recipe) -> None:
    """The optimizer and scheduler whose state the checkpoint holds are the recipe's, and so are the
    adapters it holds."""
    old = payload.get("recipe", {})
    if "recipe" in payload:
        check_adapters((old.get("model") or {}).get("peft"), recipe.model.get("peft"), path)
    for key in ("optimizer", "scheduler"):
        before = (old.get(key) or {}).get("_component_")
        now = (getattr(recipe, key) or {}).get("_component_")
        if before != now and "recipe" in payload:
            raise RecipeError(
                f"{key}._component_",
                f"{path} holds the state of {before}, not {now}; resume with {key}._component_={before}, {_START_OVER}",
            )


# what may change between a LoRA run and its resume: dropout draws differently, the adapters mean the same
_ADAPTER_FREE_KEYS = frozenset({"lora_dropout"})


def check_adapters(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None, path: Path) -> None:
    """model.peft as the checkpoint's adapters were trained: another rank or targets would not load,
    another lora_alpha would rescale them mid-run (the same weights, another model)."""
    if (saved is None) != (now is None):
        was = "with adapters (model.peft)" if saved else "without adapters"
        raise RecipeError("model.peft", f"{path} was trained {was}; resume as it was trained, {_START_OVER}")
    if saved is None or now is None:
        return
    for key in sorted(set(saved) | set(now)):
        if key not in _ADAPTER_FREE_KEYS and saved.get(key) != now.get(key):
            raise RecipeError(
                f"model.peft.{key}",
                f"{path} holds adapters trained with {key}={saved.get(key)!r}, not {now.get(key)!r}: they would "
                f"change mid-run; resume with model.peft.{key}={saved.get(key)!r}, {_START_OVER}",
            )


def check_global_batch(saved: int | None, now: int, path: Path) -> None:
    if saved is not None and saved != now:
        raise RecipeError(
            "train.global_batch_size",
            f"{path} was trained with a global batch of {saved}, this run's is {now}: the update would "
            f"change mid-run; set train.global_batch_size={saved} (any world size that divides it "
            f"continues exactly), {_START_OVER}",
        )


def _plan_of_old_checkpoint(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the plan was saved: their global batch, from the saved recipe."""
    r = payload["recipe"]
    batch = r["train"].get("global_batch_size") or r["data"]["batch_size"] * payload["world_size"]
    return {"global_batch": batch, "train_samples": None, "steps_per_epoch": None}


def restore(
    payload: Mapping[str, Any],
    path: Path,
    saved: Mapping[str, Stateful | None],
    recipe: Recipe,
    plan: Plan,
    session: Session,
) -> None:
    """Everything but the RNG streams (restore_rng: last, as they are the streams the loop
    continues), and but a whole model (restored before wrapping, load_for_resume). A sharded
    checkpoint's model and optimizer load here, into this run's shards or whole tensors."""
    try:
        if checkpointer.has_shards(payload):
            checkpointer.restore_sharded(path, payload, _by_name(saved, str(path)))
        checkpointer.restore(payload, {"optimizer": saved["optimizer"]})
    except (KeyError, ValueError, RuntimeError) as e:
        raise RecipeError(
            "optimizer",
            f"{path} holds optimizer state that does not fit this optimizer "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); resume with the "
            f"optimizer settings it was saved with, {_START_OVER}",
        ) from None
    if (saved["scheduler"] is None) != (payload["scheduler"] is None):
        log.warning(f"resuming {path} with{'' if saved['scheduler'] else 'out'} a scheduler it was saved without/with")
    checkpointer.restore(
        payload, {k: saved[k] for k in ("scheduler", "scaler", "train_state", "log_window", "loggers")}
    )
    if payload["world_size"] != plan.world_size:
        log.warning(
            f"{path} was saved by {payload['world_size']} ranks and resumes on {plan.world_size}: "
            "the data order continues exactly; per-rank random streams (dropout) cannot"
        )
    if session.is_main:
        state = payload["train_state"]
        changed = _changed_keys(payload["recipe"], recipe.to_dict())
        note = f" with changes: {', '.join(changed)}" if changed else ""
        log.info(f"resuming from {path} at step {state['step']} (epoch {state['epoch']}){note}")
        # torch's load_state_dict puts the saved hyperparameters back: say so rather than seem to apply them
        ignored = [c.split(":")[0] for c in changed if c.startswith(("optimizer.", "scheduler."))]
        if ignored:
            log.warning(
                f"{', '.join(ignored)} changed, but the optimizer and scheduler continue with the values "
                f"saved in {path} (torch restores them); to change them, start over with "
                "checkpoint.resume=none run.overwrite=true"
            )


def _by_name(saved: Mapping[str, Stateful | None], source: str) -> dict[str, Stateful]:
    """The model and optimizer as DCP reads them, whichever strategy this run uses; `source` (the
    checkpoint's path) is what a refusal names."""
    model, optimizer = saved["model"], saved["optimizer"]
    if isinstance(model, ModelState) and isinstance(optimizer, OptimizerState):
        model.source = source
        return {"model": model, "optimizer": optimizer}
    base = model.base if isinstance(model, frozen.Trainable) else None
    module = model.model if isinstance(model, frozen.Trainable) else model
    assert isinstance(module, torch.nn.Module) and isinstance(optimizer, torch.optim.Optimizer)
    return {"model": ModelState(module, base, source), "optimizer": OptimizerState(module, optimizer)}


def restore_rng(payload: Mapping[str, Any], saved: Mapping[str, Stateful | None]) -> None:
    checkpointer.restore(payload, {"rng": saved["rng"]})


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b and a != REDACTED:  # a value hidden when saved cannot be compared (nor shown)
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_model_matches(
    model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, torch.Tensor], source: Path
) -> None:
    """One clear error listing what differs, rather than load_state_dict's wall of text."""
    check_shapes_match(shapes_of(model_state), shapes_of(ckpt_state), source)


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each tensor's (whole) shape, by name: what a checkpoint's marker keeps of its model."""
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_shapes_match(
    model: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]], source: Path
) -> None:
    """The model's tensors against a checkpoint's, by name and shape: a RecipeError saying how to
    go on, at once (the `--nproc` parent checks the marker's shapes before any worker starts)."""
    missing = [k for k in model if k not in saved]
    unexpected = [k for k in saved if k not in model]
    shapes = [
        f"{k} {tuple(saved[k])} vs model {tuple(v)}"
        for k, v in model.items()
        if k in saved and tuple(saved[k]) != tuple(v)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_few(shapes)}")
        raise RecipeError(
            "checkpoint.resume",
            f"{source} was saved from a different model: {'; '.join(parts)}; resume it with the recipe "
            "that wrote it, or start afresh: another name=... or run.dir=..., or here with "
            "checkpoint.resume=none run.overwrite=true (which deletes its checkpoints)",
        )


def _few(items: list[str], n: int = 4) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "") + "]"
