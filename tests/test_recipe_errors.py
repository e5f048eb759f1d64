"""Bad recipes and overrides: exit code 2 and exactly one stderr line naming the key."""

from __future__ import annotations

import re

import pytest

from conftest import DELETE, launcher, recipe_dict, write_recipe
from launcher.commands import cli
from launcher.recipe.yaml_io import apply_overrides, parse_value

# (description, recipe changes, overrides, the key the error must name, a phrase it must contain)
TINY_GPT2 = {"_component_": "transformers.GPT2Config", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 16}
TINY_GPT2 |= {"bos_token_id": 2, "eos_token_id": 2}  # within the vocabulary: transformers warns otherwise
LORA = {"_component_": "peft.LoraConfig", "r": 4, "target_modules": "all-linear"}
LORA_ON_QWEN_NAMES = {**LORA, "target_modules": ["q_proj", "v_proj"]}
TINY_GPT = {"_component_": "launcher.models.GPT", "vocab_size": 16, "seq_len": 8, "d_model": 8, "n_layers": 1}
TINY_GPT |= {"n_heads": 2}
NOT_PEFT = {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 2}
BAD = [
    ("unknown top-level key", {"epochs": 3}, [], "epochs", "unknown key"),
    ("typo in a section, with a suggestion", {"train.epoch": 3}, [], "train.epoch", "did you mean 'epochs'"),
    (
        "misspelled required section: named before 'missing'",
        {"optimiser": {"_component_": "torch.optim.SGD", "lr": 0.1}, "optimizer": DELETE},
        [],
        "optimiser",
        "did you mean 'optimizer'",
    ),
    ("wrong type", {}, ["train.epochs=ten"], "train.epochs", "expected an integer"),
    ("string where an int is needed", {"train.epochs": "3"}, [], "train.epochs", "expected an integer"),
    ("bool where an int is needed", {"data.batch_size": True}, [], "data.batch_size", "expected an integer"),
    ("non-positive batch", {}, ["data.batch_size=0"], "data.batch_size", "greater than 0"),
    ("unknown precision", {}, ["train.precision=fp64"], "train.precision", "one of"),
    ("unknown backend", {}, ["dist.backend=mpi"], "dist.backend", "'auto', 'nccl', 'gloo'"),
    ("global batch does not divide", {}, ["train.global_batch_size=12"], "train.global_batch_size", "not a multiple"),
    ("missing _component_", {"loss._component_": DELETE, "loss.reduction": "mean"}, [], "loss._component_", "missing"),
    ("component not importable", {}, ["model._component_=nope.Model"], "model._component_", "cannot import"),
    (
        "component attribute typo",
        {},
        ["optimizer._component_=torch.optim.AdamX"],
        "optimizer._component_",
        "did you mean 'Adam'",
    ),
    ("component argument typo", {}, ["optimizer.betaz=[0.9,0.99]"], "optimizer.betaz", "did you mean 'betas'"),
    (
        "launcher-supplied argument in the recipe",
        {"optimizer.params": []},
        [],
        "optimizer.params",
        "passed by the launcher",
    ),
    ("missing required section", {"optimizer": DELETE}, [], "optimizer", "required key is missing"),
    (
        "no loss for a model that computes none",
        {"loss": DELETE},
        [],
        "loss",
        "the recipe names no loss, so the model must compute its own from a mapping batch",
    ),
    (
        "checkpointing a non-Sequential model",
        {"model": {"_component_": "torch.nn.Linear", "in_features": 8, "out_features": 1}},
        ["train.activation_checkpointing.segments=2"],
        "train.activation_checkpointing.segments",
        "nn.Sequential",
    ),
    (
        "more segments than modules",
        {},
        ["train.activation_checkpointing.segments=9"],
        "train.activation_checkpointing.segments",
        "at most",
    ),
    ("neither epochs nor max_steps", {"train.epochs": DELETE}, [], "train.epochs", "train.max_steps"),
    (
        "two kinds of clipping",
        {"train.grad_clip_norm": 1.0, "train.grad_clip_value": 1.0},
        [],
        "train.grad_clip_value",
        "not both",
    ),
    (
        "eval without val data",
        {"data.val": None, "train.eval_every_steps": 2},
        [],
        "train.eval_every_steps",
        "data.val",
    ),
    (
        "unknown early-stopping metric",
        {"train.early_stopping": {"metric": "val_acc"}},
        [],
        "train.early_stopping.metric",
        "val_accuracy",
    ),
    ("negative learning rate", {}, ["optimizer.lr=-1"], "optimizer.lr", "non-negative"),
    ("override into a scalar", {}, ["seed.x=1"], "seed.x", "not a section"),
    ("malformed override", {}, ["epochs"], "epochs", "key.path=value"),
    ("dataset argument rejected by the dataset", {"data.train.size": -3}, [], "data.train", "building"),
    (
        "drop_last with less than one batch",
        {"data.drop_last": True, "data.train.size": 5},
        [],
        "data.drop_last",
        "fewer than one global batch",
    ),
    ("bad run name", {"name": "a/b"}, [], "name", "letters, digits"),
    ("infinite learning rate", {}, ["optimizer.lr=.inf"], "optimizer.lr", "finite"),
    ("NaN learning rate", {}, ["optimizer.lr=.nan"], "optimizer.lr", "finite"),
    ("NaN inside a component", {}, ["optimizer.betas=[0.9, .nan]"], "optimizer.betas[1]", "finite"),
    ("infinite timeout", {}, ["dist.timeout_s=.inf"], "dist.timeout_s", "finite"),
    ("absurd timeout", {}, ["dist.timeout_s=1e300"], "dist.timeout_s", "less than or equal to 2592000"),
    ("NaN clipping", {}, ["train.grad_clip_norm=.nan"], "train.grad_clip_norm", "finite"),
    ("float seed", {}, ["seed=1e23"], "seed", "expected an integer"),
    ("huge seed", {}, ["seed=100000000000000000000000"], "seed", "less than"),
    ("negative seed", {}, ["seed=-1"], "seed", "greater than or equal to 0"),
    ("huge count", {}, ["log.every_n_steps=10000000000000"], "log.every_n_steps", "less than or equal to"),
    (
        "pretrained weights in a meta-device build",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "pretrained": "org/model"}},
        ["dist.strategy=fsdp", "dist.fsdp.meta_init=true"],
        "dist.fsdp.meta_init",
        "model.pretrained=org/model",
    ),
    (
        "LoRA split by tensor parallelism",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "pretrained": "org/model", "peft": LORA}},
        ["dist.strategy=fsdp", "dist.tensor_parallel=2"],
        "dist.tensor_parallel",
        "with model.peft (LoRA) is not supported",
    ),
    (
        "LoRA base built on the meta device",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "config": TINY_GPT2, "peft": LORA}},
        ["dist.strategy=fsdp", "dist.fsdp.meta_init=true"],
        "dist.fsdp.meta_init",
        "frozen parameters",
    ),
    (
        "LoRA on layers the model lacks",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "config": TINY_GPT2, "peft": LORA_ON_QWEN_NAMES}},
        [],
        "model.peft.target_modules",
        "matches no layer of the model; its layers are named c_attn, c_fc, c_proj",
    ),
    (
        "LoRA of rank 0",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "config": TINY_GPT2, "peft": {**LORA, "r": 0}}},
        [],
        "model.peft.r",
        "positive whole number, got 0",
    ),
    (
        "model.peft that is no peft config",
        {"model": {"_component_": "launcher.models.hf.causal_lm", "config": TINY_GPT2, "peft": NOT_PEFT}},
        [],
        "model.peft._component_",
        "expected a peft config component",
    ),
    (
        # built on the meta device at check, the run failed allocating its 2.8 TiB position embedding
        "a position embedding no machine holds",
        {"model": {**TINY_GPT, "d_model": 384}},
        ["model.seq_len=2000000000"],
        "model.seq_len",
        "2,000,000,000 makes a 2,000,000,000 x 384 weight of 2.79 TiB",
    ),
    ("a vocabulary no machine holds", {"model": TINY_GPT}, ["model.vocab_size=50000000000"], "model.vocab_size", "TiB"),
    ("a width no machine holds", {"model": TINY_GPT}, ["model.d_model=600000"], "model.d_model", "600,000 makes"),
    (
        "blocks no cluster holds",
        {"model": {**TINY_GPT, "d_model": 200000}},
        ["model.n_layers=100"],
        "model.n_layers",
        "far",
    ),
    ("blocks that take hours to build", {"model": TINY_GPT}, ["model.n_layers=1000000"], "model.n_layers", "hours"),
    (
        "any model's parameter no machine holds, named by the size that made it",
        {"model": {"_component_": "launcher.models.MLP", "sizes": [8, 2**38, 1]}},
        [],
        "model.sizes",
        "the parameter 1.weight alone is 274,877,906,944 x 8 float32",
    ),
    (
        "any model's weights beyond any cluster",
        {"model": {"_component_": "launcher.models.MLP", "sizes": [2**18] * 260}},
        [],
        "model",
        "far beyond any cluster's memory",
    ),
    # a sum trained 4.5% apart on 2 ranks and on 1 (the loop weights each micro-batch's loss as a mean)
    ("a loss that sums", {"loss.reduction": "sum"}, [], "loss.reduction", "'sum' is not a mean"),
    ("a loss per element", {"loss.reduction": "none"}, [], "loss.reduction", "'none' gives a loss per element"),
    ("a legacy argument that sums", {"loss.size_average": False}, [], "loss.reduction", "set loss.reduction=mean"),
    (
        "a loss of one's own that sums",
        {"loss": {"_component_": "testkit.SummedSquaredError"}},
        [],
        "loss",
        "testkit.SummedSquaredError returns a sum over the batch, not a mean",
    ),
    (
        "a loss of one's own per sample",
        {"loss": {"_component_": "testkit.SquaredErrorPerSample"}},
        [],
        "loss",
        "testkit.SquaredErrorPerSample returns 2 numbers (shape (2,)) for a batch of 2, not one",
    ),
    (
        "model that is not a module",
        {"model": {"_component_": "testkit.not_a_module"}},
        [],
        "model._component_",
        "not a torch.nn.Module",
    ),
]


@pytest.mark.parametrize("desc,changes,overrides,key,phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_exits_2_with_one_line_naming_the_key(tmp_path, capsys, desc, changes, overrides, key, phrase):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**changes))
    code = cli.main(["check", str(path), "--nproc", "2", *overrides])
    out, err = capsys.readouterr()
    assert code == 2, f"{desc}: exit {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {key}: "), lines[0]
    assert phrase in lines[0], lines[0]


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    assert cli.main(["check", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}:3:1: invalid YAML")
    assert cli.main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err
    assert cli.main(["run", str(bad), "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc: must be at least 1, got 0"


def test_real_process_exit_code_and_single_stderr_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"train.epoch": 3}))
    for args in (["check", path], ["run", path], ["run", "--nproc", "2", path], ["check", path, "--bogus"]):
        proc = launcher(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr


def test_an_argument_the_component_lacks_is_the_same_line_at_run_as_at_check(tmp_path):
    """`launcher run` words a component's unknown argument as check does (it said 'building ... failed
    at components.py: TypeError: ... unexpected keyword argument')."""
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"data.train.sizes": 64}))
    lines = []
    for command in ("check", "run"):
        proc = launcher(command, path)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stderr
        lines.append(said[0])
    assert lines[0] == lines[1] and lines[0].startswith("error: data.train.sizes: "), lines
    assert "takes no argument 'sizes'; did you mean 'size'?" in lines[0], lines[0]


def test_a_loss_that_sums_is_the_same_line_at_run_as_at_check(tmp_path):
    """The run builds the loss itself: a sum is refused there too, before the first step."""
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"loss.reduction": "sum", "run.dir": str(tmp_path / "run")}))
    lines = []
    for command in ("check", "run"):
        proc = launcher(command, path)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stderr
        lines.append(said[0])
    assert lines[0] == lines[1] and lines[0].startswith("error: loss.reduction: 'sum' is not a mean"), lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_overrides_are_yaml_typed():
    raw = apply_overrides(
        {"optimizer": {"lr": 1.0}},
        [
            "optimizer.lr=3e-4",
            "train.epochs=2",
            "scheduler=null",
            "optimizer.betas=[0.9, 0.95]",
            "run.dir=a=b",
            "name=x",
        ],
    )
    assert raw == {
        "optimizer": {"lr": 3e-4, "betas": [0.9, 0.95]},
        "train": {"epochs": 2},
        "scheduler": None,
        "run": {"dir": "a=b"},
        "name": "x",
    }
    assert isinstance(parse_value("1e-3"), float) and parse_value("1.5e3") == 1500.0
    assert parse_value("true") is True and parse_value("'3'") == "3"


def test_check_prints_resolved_config_and_plan(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict())
    assert cli.main(["check", str(path), "--nproc", "2", "optimizer.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "timeout_s: 600.0" in out  # overrides applied, defaults filled in
    for row in (
        "world size",
        "micro-batch per rank",
        "accumulation steps",
        "global batch",
        "steps per epoch",
        "total optimizer steps",
        "backend / device",
        "checkpoint segments",
    ):
        assert row in out
    assert re.search(r"accumulation steps +2\n", out)


def test_check_says_what_async_checkpoints_cost_and_when_they_do_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(**{"checkpoint.async_save": True}))
    assert cli.main(["check", str(path)]) == 0
    assert "checkpoint.async_save: no effect without checkpoint.every_n_steps" in capsys.readouterr().out
    assert cli.main(["check", str(path), "--nproc", "2", "checkpoint.every_n_steps=5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"checkpoint.async_save: each save holds a host copy of the state, about [\d.]+ MiB per rank", out)


def test_check_tolerates_data_that_is_not_here(tmp_path, capsys):
    r = recipe_dict(
        **{"data.train": {"_component_": "launcher.datasets.vision.image_folder", "root": str(tmp_path / "none")}}
    )
    path = write_recipe(tmp_path / "r.yaml", r)
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch" in out and "unknown" in out
    # the last line says so (a long plan buried it as one warning among many), and --strict fails on it
    assert out.strip().splitlines()[-1].startswith("check: NOT all checked: data.train: "), out
    assert cli.main(["check", str(path), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: data.train: ")
        and err[0].endswith("(--strict: data that cannot be read here fails the check)")
    )


def test_duplicate_keys_binary_files_and_alias_bombs_are_one_line_errors(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\ntrain:\n  epochs: 1\n  global_batch_size: 8\ndata: {batch_size: 4}\ntrain:\n  epochs: 2\n")
    assert cli.main(["check", str(dup)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"error: {dup}:6: duplicate key 'train' (first at line 2, again at line 6); a later one would "
        "silently replace the earlier: keep one"
    ), err
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: x\noptimizer:\n  lr: 1\n  lr: 2\n")
    assert cli.main(["check", str(nested)]) == 2
    assert "duplicate key 'lr' (first at line 3, again at line 4)" in capsys.readouterr().err
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["check", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {binary}: is not a text file") and err.count("\n") == 1, err
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)
    ]  # 10**9 values from a few hundred bytes
    bomb.write_text("\n".join(lines) + "\nname: x\n")
    assert cli.main(["check", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "expands to more than 100,000 values through YAML aliases" in err and err.count("\n") == 1, err
    ok = write_recipe(tmp_path / "anchors.yaml", recipe_dict())  # a few aliases are fine
    ok.write_text(ok.read_text() + "x_defaults: &d {lr: 0.01}\n")
    assert cli.main(["check", str(ok)]) == 2 and "unknown key" in capsys.readouterr().err  # reaches validation


def test_run_without_a_recipe_and_the_version(capsys):
    for command in ("run", "check", "debug", "slurm"):
        assert cli.main([command]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err == f"error: launcher {command}: which recipe? e.g. launcher {command} recipes/quickstart.yaml "
            "[key.path=value ...]"
        ), err
    proc = launcher("--version")
    from launcher import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"launcher {__version__}"


def test_a_build_failure_names_its_root_cause_on_the_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(model={"_component_": "testkit.fails_to_import_a_module"}))
    assert cli.main(["check", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "ModuleNotFoundError: Could not import module 'GPT2LMHeadModel'" in line, line
    assert "; caused by RuntimeError: operator torchvision::nms does not exist" in line, line


def test_a_vision_recipe_without_torchvision_names_the_extra():
    import subprocess
    import sys

    from conftest import ROOT, worker_env

    code = "import sys; sys.modules['torchvision'] = None; from launcher.commands import cli; "
    code += "sys.exit(cli.main(['check', sys.argv[1]]))"
    path = ROOT / "recipes" / "cifar10_resnet18.yaml"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("install the [vision] extra: pip install 'launcher[vision]'")


def test_a_per_sample_loss_of_ones_own_passes_the_mean_probe(tmp_path, capsys):
    """Summed over each sample, then the mean over the samples: a mean over the batch, as the loop needs."""
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(loss={"_component_": "testkit.PerSampleSquaredError"}))
    assert cli.main(["check", str(path), "--nproc", "2"]) == 0, capsys.readouterr().err
