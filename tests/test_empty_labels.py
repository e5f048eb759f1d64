"""A micro-batch, a validation batch or a whole window with no valid label (every target -100):
its token mean is 0/0, and it must add exactly nothing, at every world size and accumulation."""

from __future__ import annotations

import json

import pytest

from conftest import DELETE, assert_close_rel, launcher, load_weights, recipe_dict, write_recipe

# the built-in GPT on padded token tuples; with data.shuffle off, rank r of W reads samples r, r+W, ...
GPT = {"_component_": "launcher.models.GPT", "vocab_size": 32, "seq_len": 16, "d_model": 16, "n_layers": 1}
# rank 0's first micro-batch of 4 holds only these samples at 2 ranks (0, 2, 4, 6) and at 3 (0, 3, 6, 9)
EMPTY = [0, 2, 3, 4, 6, 9]
BASE = {
    "model": {**GPT, "n_heads": 2},
    "data.train": {"_component_": "testkit.UnlabelledTokens", "empty": EMPTY},
    "data.val": {"_component_": "testkit.UnlabelledTokens", "size": 9, "seed": 1, "empty": [0, 2, 4, 6]},
    "data.shuffle": False,
    "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
    "train.loss_mean_over": "tokens",
    "train.global_batch_size": 24,
    "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
}


def go(tmp_path, name, nproc=None, **changes):
    r = recipe_dict(**{**BASE, "run.dir": str(tmp_path / name), **changes})
    proc = launcher("run", *(["--nproc", str(nproc)] if nproc else []), write_recipe(tmp_path / f"{name}.yaml", r))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name, proc


def rows(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_micro_batches_without_labels_add_nothing_at_2_and_3_ranks(tmp_path):
    one, _ = go(tmp_path, "one", **{"data.batch_size": 24})
    assert all(r > 0 for r in rows(one, "tokens_per_s"))  # padded samples: the labels counted, per second
    for nproc in (2, 3):
        run_dir, _ = go(tmp_path, f"w{nproc}", nproc=nproc)
        assert_close_rel(load_weights(run_dir), load_weights(one), rtol=1e-5)
        for key in ("loss", "val_loss"):
            got, want = rows(run_dir, key), rows(one, key)
            assert len(got) == len(want) > 0 and all(
                abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want, strict=True)
            ), key


def test_a_window_without_labels_gives_zero_gradients_and_is_reported(tmp_path):
    """Every label -100: SGD without momentum leaves the weights exactly as an lr=0 run does."""
    changes = {"data.train.empty": "all", "optimizer.momentum": 0.0, "train.max_steps": 2, "train.epochs": None}
    run_dir, proc = go(tmp_path, "empty", nproc=2, **changes)
    still, _ = go(tmp_path, "still", **{**changes, "optimizer.lr": 0.0})
    got, want = load_weights(run_dir), load_weights(still)
    assert all(got[k].equal(want[k]) for k in want)
    assert "step 1: no valid label in the whole window" in proc.stderr
    assert rows(run_dir, "loss") == [0.0, 0.0]


def test_one_token_documents_add_nothing_to_a_models_own_loss_at_2_ranks(tmp_path):
    """A transformers GPT-2 computing its own loss predicts labels[..., 1:]: a micro-batch of one
    document of one token has no position to predict at all (it was a NaN loss at step 1), so it
    must add exactly nothing, and 2 ranks x micro-batch 1 equal one process with micro-batch 2."""
    from hfkit import tiny_gpt2

    # with data.shuffle off, each step's pair is (rank 0's, rank 1's): one of them a single token
    lengths = [6, 1, 4, 1, 1, 7, 9, 1]
    changes = {
        "model": tiny_gpt2(),
        "data.train": {"_component_": "testkit.Documents", "lengths": lengths},
        "data.val": DELETE,
        "data.collate": {"_component_": "launcher.collate.PadToLongest"},
        "loss": DELETE,
        "train.loss_mean_over": "auto",
        "train.global_batch_size": 2,
        "train.epochs": 1,
        "optimizer.momentum": 0.0,
    }
    one, _ = go(tmp_path, "one", **{**changes, "data.batch_size": 2})
    ranks, _ = go(tmp_path, "w2", nproc=2, **{**changes, "data.batch_size": 1})
    assert_close_rel(load_weights(ranks), load_weights(one), rtol=1e-5)
    assert rows(ranks, "loss") == pytest.approx(rows(one, "loss"), rel=1e-5)
    assert len(rows(one, "loss")) == 4
