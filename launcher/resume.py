"""What a checkpoint holds and how a run continues from one, exactly.

Saved at an optimizer-step boundary: the unwrapped model, optimizer, scheduler and GradScaler
states, the TrainState (step, epoch, step within the epoch, early stopping), every rank's RNG
streams, the recipe, and the ids of external loggers. The data position needs nothing more: the
sampler's permutation is a function of (seed, epoch), and the step within the epoch says how many
of this rank's samples to skip (ShardSampler.set_start), so nothing already trained on is reloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher import checkpoint, distributed
from launcher.errors import RecipeError, TrainingError
from launcher.logs import log
from launcher.plan import Plan
from launcher.recipe import Recipe

FORMAT = 1


def check_finite(t) -> torch.Tensor:
    """Every rank's per-step loss sums since the last log ([ranks, steps], on the CPU). With
    on_nonfinite=stop, raise if any is non-finite, naming the first such step and its rank(s).
    Syncs; called at log steps, before every save, and at the end, so nothing corrupt is written."""
    mine = t.window.loss_sums[:t.window.steps].detach()
    if distributed.is_initialized() and t.session.world_size > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(mine) for _ in range(t.session.world_size)]
        dist.all_gather(gathered, mine.contiguous())
        per_rank = torch.stack(gathered).cpu()
    else:
        per_rank = mine.cpu().unsqueeze(0)
    if t.recipe.train.on_nonfinite == "stop" and not torch.isfinite(per_rank).all():
        bad = ~torch.isfinite(per_rank)
        first = int(bad.any(dim=0).nonzero()[0])
        step = t.state.step - t.window.steps + first + 1
        ranks = ", ".join(str(r) for r in bad[:, first].nonzero().flatten().tolist())
        last = t.state.last_checkpoint_step
        kept = f"the last checkpoint (step {last}) is intact" if last >= 0 else "no checkpoint was written"
        raise TrainingError(f"non-finite loss at step {step} on rank {ranks} (train.on_nonfinite=stop); "
                            f"nothing after it was saved and {kept}")
    return per_rank


def save_checkpoint(t) -> Path | None:
    """Every rank calls this at the same step; rank 0 writes. Returns the path on rank 0."""
    s = t.state
    if s.last_checkpoint_step == s.step:
        return None
    per_rank = check_finite(t)
    rng = distributed.gather_objects(checkpoint.capture_rng(), group=t.session.control)
    path = None
    s.last_checkpoint_step = s.step
    if t.session.rank == 0:
        payload: dict[str, Any] = {
            "format": FORMAT,
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "train_state": s.state_dict(),
            "rng": rng,
            "world_size": t.plan.world_size,
            "plan": {"global_batch": t.plan.global_batch, "train_samples": t.plan.train_samples,
                     "steps_per_epoch": t.plan.steps_per_epoch},
            # the log steps since the last log row, summed over ranks: a resumed run's first row then
            # averages over the same steps as the uninterrupted run's
            "log_window": {"loss_sums": per_rank.sum(0), "samples": t.window.samples},
            "recipe": t.recipe.to_dict(),
            "loggers": dict(t.logger_ids),
        }
        path = checkpoint.write_checkpoint(t.recipe.checkpoint_dir, s.step, payload,
                                           summary={"global_batch": t.plan.global_batch})
        checkpoint.prune(t.recipe.checkpoint_dir, t.recipe.checkpoint.keep_last)
        log.info(f"checkpoint: {path}")
    # nobody leaves (and, under torchrun, gets its peers killed) before the checkpoint is on disk
    distributed.barrier(t.session.control)
    return path


def load_for_resume(path: Path, model: torch.nn.Module, recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """Load a checkpoint, check that this recipe can continue it exactly, and put its weights in
    `model` (before wrapping)."""
    payload = checkpoint.load(path)
    check_compatible(payload, path, recipe, plan)
    checkpoint.check_model_matches(model.state_dict(), payload["model"], path)
    model.load_state_dict(payload["model"])
    return payload


_START_OVER = "or start over with checkpoint.resume=none run.overwrite=true"


def check_compatible(payload: dict[str, Any], path: Path, recipe: Recipe, plan: Plan) -> None:
    """One line naming the key, for a recipe that cannot continue this checkpoint's maths."""
    saved = payload.get("plan") or _plan_of_old_checkpoint(payload)
    check_global_batch(saved["global_batch"], plan.global_batch, path)
    state = payload["train_state"]
    if state["step_in_epoch"] >= plan.steps_per_epoch:
        raise RecipeError("data.train", f"{path} stopped at step {state['step_in_epoch']} of an epoch, but an epoch now "
                                        f"has {plan.steps_per_epoch} steps ({plan.train_samples} samples, data.drop_last="
                                        f"{str(plan.drop_last).lower()}); resume with the data it was trained on, {_START_OVER}")
    if saved["train_samples"] != plan.train_samples:
        log.warning(f"{path} was trained on {saved['train_samples']} samples and resumes on {plan.train_samples}: "
                    "the data order from here differs from the uninterrupted run's")
    old = payload.get("recipe", {})
    for key in ("optimizer", "scheduler"):
        before = (old.get(key) or {}).get("_component_")
        now = (getattr(recipe, key) or {}).get("_component_")
        if before != now and "recipe" in payload:
            raise RecipeError(f"{key}._component_", f"{path} holds the state of {before}, not {now}; resume with "
                                                    f"{key}._component_={before}, {_START_OVER}")


def check_global_batch(saved: int | None, now: int, path: Path) -> None:
    if saved is not None and saved != now:
        raise RecipeError("train.global_batch_size",
                          f"{path} was trained with a global batch of {saved}, this run's is {now}: the update would "
                          f"change mid-run; set train.global_batch_size={saved} (any world size that divides it "
                          f"continues exactly), {_START_OVER}")


def _plan_of_old_checkpoint(payload: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the plan was saved: their global batch, from the saved recipe."""
    r = payload["recipe"]
    batch = r["train"].get("global_batch_size") or r["data"]["batch_size"] * payload["world_size"]
    return {"global_batch": batch, "train_samples": None, "steps_per_epoch": None}


def restore(t, payload: dict[str, Any], path: Path) -> None:
    """Everything but the weights, which `load_for_resume` restored before DDP wrapping."""
    try:
        t.optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise RecipeError("optimizer", f"{path} holds optimizer state that does not fit this optimizer "
                                       f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); resume with the "
                                       f"optimizer settings it was saved with, {_START_OVER}") from None
    if t.scheduler is not None and payload["scheduler"] is not None:
        t.scheduler.load_state_dict(payload["scheduler"])
    elif (t.scheduler is None) != (payload["scheduler"] is None):
        log.warning(f"resuming {path} with{'' if t.scheduler else 'out'} a scheduler it was saved without/with")
    if t.scaler is not None and payload["scaler"] is not None:
        t.scaler.load_state_dict(payload["scaler"])
    t.state.load_state_dict(payload["train_state"])
    t.state.stop_reason = None
    t.state.last_checkpoint_step = t.state.step
    t.logger_ids.update(payload.get("loggers", {}))
    window = payload.get("log_window")
    if window is not None and len(window["loss_sums"]) <= len(t.window.loss_sums):
        t.window.restore(window["loss_sums"] if t.session.rank == 0 else None, len(window["loss_sums"]),
                         window["samples"])
    rng = payload["rng"]
    rank = t.session.rank
    if payload["world_size"] != t.plan.world_size:
        log.warning(f"{path} was saved by {payload['world_size']} ranks and resumes on {t.plan.world_size}: "
                    "the data order continues exactly; per-rank random streams (dropout) cannot")
    if rank < len(rng):
        checkpoint.restore_rng(rng[rank])
    if rank == 0:
        changed = _changed_keys(payload["recipe"], t.recipe.to_dict())
        note = f" with changes: {', '.join(changed)}" if changed else ""
        log.info(f"resuming from {path} at step {t.state.step} (epoch {t.state.epoch}){note}")
        # torch's load_state_dict puts the saved hyperparameters back: say so rather than seem to apply them
        ignored = [c.split(":")[0] for c in changed if c.startswith(("optimizer.", "scheduler."))]
        if ignored:
            log.warning(f"{', '.join(ignored)} changed, but the optimizer and scheduler continue with the values "
                        f"saved in {path} (torch restores them); to change them, start over with "
                        "checkpoint.resume=none run.overwrite=true")


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
