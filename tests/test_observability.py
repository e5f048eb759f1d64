"""What a run shows: wandb (offline, read back), metrics, TensorBoard, progress, plots, and debugging."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_close_rel, launcher, load_weights, recipe_dict, worker_env, write_recipe
from launcher.checkpoint import step_dirs
from runs import recipe
from wandb_files import config as wandb_config
from wandb_files import history, run_id

WANDB = {"log.wandb": {"mode": "offline", "project": "tests"}}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_one_run_for_two_ranks_matching_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher(
        "run", "--nproc", "2", write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir), **WANDB}))
    )
    assert proc.returncode == 0, proc.stderr
    files = wandb_files(run_dir)
    assert len(files) == 1  # rank 1 started no run
    logged = {r["_step"]: r for r in history(files[0])}
    train = [r for r in rows(run_dir) if "loss" in r]
    assert len(train) == 6
    for r in train:
        assert logged[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert logged[r["step"]]["lr"] == pytest.approx(r["lr"], rel=1e-12)
    evals = [r for r in rows(run_dir) if "val_loss" in r]
    assert logged[evals[-1]["step"]]["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    cfg = wandb_config(files[0])
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["train"]["global_batch_size"] == 16  # the resolved recipe


def test_wandb_run_continues_across_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        launcher(
            "run", "--nproc", "2", write_recipe(tmp_path / "a.yaml", recipe(run_dir, **WANDB, **{"train.max_steps": 4}))
        ).returncode
        == 0
    )
    proc = launcher("run", "--nproc", "2", write_recipe(tmp_path / "b.yaml", recipe(run_dir, **WANDB)))
    assert proc.returncode == 0, proc.stderr
    ids = {run_id(f) for f in wandb_files(run_dir)}
    assert len(wandb_files(run_dir)) == 2 and len(ids) == 1  # two sessions, one run
    (the_id,) = ids
    assert (run_dir / "wandb_run_id").read_text().strip() == the_id
    assert step_dirs.load(step_dirs.find_latest(run_dir / "checkpoints"))["loggers"]["wandb"] == the_id


def test_no_secret_is_written_anywhere(tmp_path):
    run_dir = tmp_path / "run"
    key = "0123456789abcdef0123456789abcdef01234567"
    r = recipe_dict(
        **{
            "run.dir": str(run_dir),
            **WANDB,
            "data.train": {"_component_": "testkit.PrivateRegression", "api_token": "TOPSECRET-123"},
        }
    )
    proc = launcher("run", write_recipe(tmp_path / "r.yaml", r), env=worker_env(WANDB_API_KEY=key))
    assert proc.returncode == 0, proc.stderr
    check = launcher("check", tmp_path / "r.yaml")
    for text in (proc.stdout, proc.stderr, check.stdout):
        assert "TOPSECRET-123" not in text and key not in text
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"TOPSECRET-123" not in data and key.encode() not in data, path
    assert "api_token: '***'" in (run_dir / "config.yaml").read_text()


def test_secrets_are_hidden_but_not_what_merely_mentions_tokens():
    from launcher.recipe.schema import REDACTED, redact

    given = {"hf_token": "hf_x", "api_key": "k", "wandb": {"password": "p", "access-token": "a"}}
    given |= {"tokenizer": "org/tok", "tokenizer_revision": "main", "pad_token_id": 0, "max_tokens": 9}
    shown = redact(given)
    assert shown["hf_token"] == shown["api_key"] == REDACTED
    assert shown["wandb"] == {"password": REDACTED, "access-token": REDACTED}
    # the tokenizer a run trained with stays in its config.yaml (it was hidden as a secret)
    assert {k: shown[k] for k in ("tokenizer", "tokenizer_revision", "pad_token_id", "max_tokens")} == {
        "tokenizer": "org/tok",
        "tokenizer_revision": "main",
        "pad_token_id": 0,
        "max_tokens": 9,
    }


def test_metrics_rows_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    launcher(
        "run",
        write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir), "log.tensorboard": True})),
        check=True,
    )
    train = [r for r in rows(run_dir) if "loss" in r]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait", "max_rss_gib"):
        assert key in train[-1], key
    assert 0 <= train[-1]["data_wait"] <= 1 and train[-1]["grad_norm"] > 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in train])


def test_startup_breakdown_keeps_the_first_step_apart_from_the_launchers_own(tmp_path):
    """startup.json: the parts add up to the time to the first step, and a slow first step (a GPU's
    first kernels, a compile; here a 1 s sleep in the first forward) is counted as the step's: the
    launcher's own share ends where the loop starts, before it."""
    run_dir = tmp_path / "run"
    model = {"_component_": "testkit.SlowFirstStep", "sizes": [8, 16, 1], "seconds": 1.0}
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(run_dir), "model": model}))
    proc = launcher("run", path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "startup.json").read_text())
    parts = ("torch_s", "model_build_s", "to_device_s", "optimizer_build_s", "first_step_itself_s", "launcher_s")
    assert sum(report[p] for p in parts) == pytest.approx(report["first_step_s"], abs=1e-3), report
    assert all(report[p] >= 0 for p in parts), report
    assert report["first_step_itself_s"] >= 1.0 and report["loop_s"] + 1.0 <= report["first_step_s"], report
    assert "the first step itself" in proc.stdout + proc.stderr


def test_tokens_per_second_for_token_data(tmp_path):
    run_dir = tmp_path / "run"
    r = recipe_dict(
        **{
            "run.dir": str(run_dir),
            "model": {
                "_component_": "launcher.models.GPT",
                "vocab_size": 32,
                "seq_len": 8,
                "d_model": 16,
                "n_layers": 1,
                "n_heads": 2,
            },
            "data.train": {
                "_component_": "launcher.datasets.synthetic.Tokens",
                "size": 37,
                "seq_len": 8,
                "vocab_size": 32,
            },
            "data.val": None,
            "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
        }
    )
    launcher("run", write_recipe(tmp_path / "r.yaml", r), check=True)
    last = rows(run_dir)[-1]
    assert last["tokens_per_s"] == pytest.approx(8 * last["samples_per_s"])


def test_progress_bar_on_a_terminal_and_quiet_other_ranks(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", "--nproc", "2", str(path)],
        env=worker_env(),
        stdout=child,
        stderr=subprocess.PIPE,
    )
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0
    assert "6/6 [" in text and "step/s" in text and "loss=" in text  # tqdm's bar, with its postfix
    assert "val_loss" in text  # evaluation rows print above the bar
    assert proc.stderr.read() == b""  # rank 1 says nothing unless it has to warn


def test_plot_writes_a_png_with_the_four_panels_for_several_runs(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        launcher(
            "run",
            write_recipe(
                tmp_path / f"{name}.yaml", recipe_dict(**{"run.dir": str(tmp_path / name), "seed": ord(name)})
            ),
            check=True,
        )
    out = tmp_path / "cmp.png"
    proc = launcher("plot", tmp_path / "a", tmp_path / "b", "-o", out)
    assert proc.returncode == 0 and proc.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (1200, 750)
    assert image.info["Description"] == "panels: loss, evaluation, learning rate, throughput"
    bad = launcher("plot", tmp_path)
    assert bad.returncode == 2 and "has no metrics.jsonl" in bad.stderr


def test_debug_runs_a_few_steps_with_timing_and_anomaly_detection(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run"), "data.num_workers": 2}))
    proc = launcher("debug", path, "--steps", "2", check=True)
    train = [r for r in rows(tmp_path / "run" / "debug") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all("step_time_s" in r and "max_rss_gib" in r for r in train)
    bad = write_recipe(
        tmp_path / "nan.yaml",
        recipe_dict(**{"run.dir": str(tmp_path / "nan"), "model": {"_component_": "testkit.NaNInBackward"}}),
    )
    proc = launcher("debug", bad, "--steps", "2")
    # anomaly detection names the backward op that produced the NaN, and where its forward ran
    assert (
        proc.returncode == 1 and "Backward0' returned nan values" in proc.stderr and "Error detected in" in proc.stderr
    )


def test_debug_distributed_runs_two_ranks(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"run.dir": str(tmp_path / "run")}))
    proc = launcher("debug", path, "--distributed", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "world size             2" in proc.stdout


def test_simulated_world_size_reproduces_a_two_rank_run(tmp_path):
    """Dropout and random data transforms included: each simulated rank has its own RNG streams."""
    real = tmp_path / "real"
    assert launcher("run", "--nproc", "2", write_recipe(tmp_path / "real.yaml", recipe(real))).returncode == 0
    path = write_recipe(tmp_path / "sim.yaml", recipe(tmp_path / "sim"))
    proc = launcher("debug", path, "--simulate-world-size", "2", "--steps", "9", check=True)
    assert "simulating 2 ranks" in proc.stdout
    sim = tmp_path / "sim" / "debug"
    assert [r["loss"] for r in rows(sim) if "loss" in r] == pytest.approx(
        [r["loss"] for r in rows(real) if "loss" in r], rel=1e-6
    )
    assert_close_rel(load_weights(sim), load_weights(real), rtol=1e-6)


def profiler_steps(trace: Path) -> list[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_profile_traces_the_chosen_steps_on_each_listed_rank_and_changes_nothing(tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    base = {"train.epochs": 4}  # 12 steps
    launcher(
        "run",
        "--nproc",
        "2",
        write_recipe(tmp_path / "a.yaml", recipe_dict(**{"run.dir": str(plain), **base})),
        check=True,
    )
    proc = launcher(
        "run",
        "--nproc",
        "2",
        write_recipe(
            tmp_path / "b.yaml",
            recipe_dict(
                **{"run.dir": str(profiled), **base, "log.profile": {"start_step": 2, "steps": 3, "ranks": [0, 1]}}
            ),
        ),
        check=True,
    )
    assert "log.profile: steps 4-6 traced" in proc.stderr + proc.stdout
    for rank in (0, 1):
        assert profiler_steps(profiled / "profile" / f"rank{rank}.trace.json") == [
            "ProfilerStep#1",
            "ProfilerStep#2",
            "ProfilerStep#3",
        ]  # after the one warm-up step
        summary = (profiled / "profile" / f"rank{rank}.txt").read_text()
        assert "Self CPU" in summary and "AdamW.step" in summary
    # the rows whose times include the profiler are marked: its warm-up step 3, then 4 to 6
    assert [r["step"] for r in rows(profiled) if r.get("profiled")] == [3, 4, 5, 6]
    assert_close_rel(load_weights(profiled), load_weights(plain), rtol=0)  # the profiler changes no number


def test_profile_cut_short_by_the_end_of_training_and_a_rank_that_does_not_exist(tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher(
        "run",
        write_recipe(
            tmp_path / "a.yaml", recipe_dict(**{"run.dir": str(run_dir), "log.profile": {"start_step": 3, "steps": 10}})
        ),
        check=True,
    )
    assert "ended after 2 of 10 profiled steps" in proc.stdout + proc.stderr
    # steps 5 and 6 (4 warms up), then the empty marker the profiler had opened for a next step
    assert profiler_steps(run_dir / "profile" / "rank0.trace.json")[:2] == ["ProfilerStep#1", "ProfilerStep#2"]
    bad = write_recipe(
        tmp_path / "b.yaml", recipe_dict(**{"run.dir": str(tmp_path / "b"), "log.profile": {"ranks": [0, 2]}})
    )
    for cmd in (("check", "--nproc", "2", bad), ("run", "--nproc", "2", bad)):
        proc = launcher(*cmd)
        assert proc.returncode == 2, proc.stderr
        assert (
            proc.stderr.strip().splitlines()[-1]
            == "error: log.profile.ranks: rank 2 does not exist at world size 2; list ranks from 0 to 1"
        )
