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
from launcher.errors import TrainingError
from launcher.metrics import log

FORMAT = 1


def check_finite(t) -> torch.Tensor:
    """Every rank's per-step loss sums since the last log ([ranks, steps], on the CPU). With
    on_nonfinite=stop, raise if any is non-finite, naming the first such step and its rank(s).
    Syncs; called at log steps, before every save, and at the end, so nothing corrupt is written."""
    mine = t.step_losses[:t._steps].detach()
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
        step = t.state.step - t._steps + first + 1
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
    check_finite(t)
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
            "recipe": t.recipe.to_dict(),
            "loggers": dict(t.logger_ids),
        }
        path = checkpoint.write_checkpoint(t.recipe.checkpoint_dir, s.step, payload)
        checkpoint.prune(t.recipe.checkpoint_dir, t.recipe.checkpoint.keep_last)
        log.info(f"checkpoint: {path}")
    # nobody leaves (and, under torchrun, gets its peers killed) before the checkpoint is on disk
    distributed.barrier(t.session.control)
    return path


def load_for_resume(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint and put its weights in `model` (before wrapping)."""
    payload = checkpoint.load(path)
    checkpoint.check_model_matches(model.state_dict(), payload["model"], path)
    model.load_state_dict(payload["model"])
    return payload


def restore(t, payload: dict[str, Any], path: Path) -> None:
    """Everything but the weights, which `load_for_resume` restored before DDP wrapping."""
    t.optimizer.load_state_dict(payload["optimizer"])
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


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
