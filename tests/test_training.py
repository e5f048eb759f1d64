"""Single-process behaviour of the loop: schedules, evaluation, early stopping, clipping, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_close_rel, load_weights, recipe_dict
from launcher.checkpoint import step_dirs
from launcher.cluster.env import ClusterEnv
from launcher.recipe.schema import validate
from launcher.train import assemble


def run(tmp_path, name="run", **changes):
    run_dir = tmp_path / name
    state = assemble.run(validate(recipe_dict(**{"run.dir": str(run_dir), **changes})), ClusterEnv())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return state, rows, run_dir


def test_warmup_then_scheduler_per_optimizer_step(tmp_path):
    _, rows, _ = run(
        tmp_path,
        **{
            "train.warmup_steps": 2,
            "train.epochs": 2,
            "optimizer.lr": 1.0,
            "scheduler": {"_component_": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5},
        },
    )
    lrs = [r["lr"] for r in rows if "lr" in r]  # the lr after each of the 6 steps (= the next step's lr)
    assert lrs == pytest.approx([2 / 3, 1.0, 0.5, 0.25, 0.125, 0.0625])


def test_eval_every_n_steps_and_final_eval(tmp_path):
    _, rows, _ = run(tmp_path, **{"train.eval_every_steps": 4, "train.epochs": 3})
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 9]


def test_early_stopping_stops_after_patience(tmp_path):
    state, rows, _ = run(
        tmp_path,
        **{
            "train.epochs": 20,
            "train.eval_every_steps": 1,
            "train.early_stopping": {"metric": "val_loss", "patience": 2, "min_delta": 1e9},
        },
    )
    assert state.stop_reason.startswith("early stopping") and state.step == 3
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3]


def test_max_steps_stops_mid_epoch(tmp_path):
    state, rows, _ = run(tmp_path, **{"train.max_steps": 4, "train.epochs": None})
    assert (state.step, state.epoch, state.step_in_epoch) == (4, 1, 1)
    assert rows[-1]["step"] == 4 and "val_loss" in rows[-1]


@pytest.mark.parametrize("kind,bound", [("grad_clip_value", "max"), ("grad_clip_norm", "norm")])
def test_clipping_bounds_the_update(tmp_path, kind, bound):
    changes = {"optimizer": {"_component_": "torch.optim.SGD", "lr": 1.0}, "train.max_steps": 1, f"train.{kind}": 1e-3}
    before = run(tmp_path, "zero", **{**changes, "optimizer.lr": 0.0})[2]
    after = run(tmp_path, "one", **changes)[2]
    a, b = load_weights(before), load_weights(after)
    delta = torch.cat([(b[k] - a[k]).flatten() for k in a])
    size = delta.abs().max() if bound == "max" else delta.norm()
    assert 1e-4 < size <= 1e-3 * (1 + 1e-5)


def test_reported_grad_norm_is_the_norm_of_the_gradients(tmp_path):
    # plain SGD at lr 1: the first update is minus the gradient, so its norm is the gradient norm
    changes = {"optimizer": {"_component_": "torch.optim.SGD", "lr": 1.0}, "train.max_steps": 1}
    a = load_weights(run(tmp_path, "zero", **{**changes, "optimizer.lr": 0.0})[2])
    _, rows, run_dir = run(tmp_path, "one", **changes)
    b = load_weights(run_dir)
    update = torch.cat([(b[k] - a[k]).flatten() for k in a]).double().norm().item()
    assert rows[0]["step"] == 1 and rows[0]["grad_norm"] == pytest.approx(update, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tmp_path, precision):
    _, rows, run_dir = run(tmp_path, precision, **{"train.precision": precision, "train.epochs": 3})
    _, ref_rows, ref_dir = run(tmp_path, "fp32", **{"train.epochs": 3})
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    w, ref = load_weights(run_dir), load_weights(ref_dir)
    assert all(torch.isfinite(w[k]).all() for k in w)
    # autocast really ran (fp16 also skips its first steps while GradScaler finds its scale)
    assert any(not torch.equal(w[k], ref[k]) for k in w)


def test_same_seed_same_run_whatever_the_worker_count(tmp_path):
    a = run(tmp_path, "a")[2]
    b = run(tmp_path, "b", **{"data.num_workers": 2})[2]
    assert all(torch.equal(x, y) for x, y in zip(load_weights(a).values(), load_weights(b).values(), strict=True))


def test_drop_last_drops_the_partial_window(tmp_path):
    state, rows, _ = run(tmp_path, **{"data.drop_last": True, "train.epochs": 2})
    assert state.step == 4  # 37 // 16 = 2 steps per epoch


def test_rerun_resumes_and_fresh_start_needs_overwrite(tmp_path):
    from launcher.errors import RecipeError

    first, rows, run_dir = run(tmp_path, "x")
    again, rows_again, _ = run(tmp_path, "x")  # resume: auto finds the final checkpoint: nothing left to do
    assert again.step == first.step and rows_again == rows
    with pytest.raises(RecipeError, match="run.dir.*already holds a run.*checkpoint.resume=auto"):
        run(tmp_path, "x", **{"checkpoint.resume": "none"})
    run(tmp_path, "x", **{"checkpoint.resume": "none", "run.overwrite": True, "train.epochs": 1})
    assert [p.name for p in step_dirs.list_checkpoints(run_dir / "checkpoints")] == [
        "step_00000003"
    ]  # the old run's are gone


def test_accumulation_alone_is_exact(tmp_path):
    # 1 rank x micro 8 x accumulation 2 equals 1 rank x micro 16: accumulation alone is exact
    a = run(tmp_path, "a", **{"data.batch_size": 8})[2]
    b = run(tmp_path, "b", **{"data.batch_size": 16})[2]
    assert_close_rel(load_weights(a), load_weights(b))
