"""`launcher verify`: a user's proof that their recipe keeps the promise (issue #35, item 2)."""

from __future__ import annotations

from conftest import ROOT, TINY_GPT_SHAPE, launcher, recipe_dict, write_recipe

# the shipped GPT recipe, CPU-sized: a few hundred parameters' worth of text, a small batch
CPU_GPT = [
    *TINY_GPT_SHAPE,
    "train.precision=fp32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.train.max_bytes=20000",
    "data.val.max_bytes=20000",
]


def test_verify_passes_the_shipped_gpt_recipe_and_fails_it_with_dropout_naming_it(tmp_path):
    """As shipped (AdamW, no dropout) every layout equals one process, exit 0, with the table; with
    model.dropout=0.1 the ranks draw their own masks: exit 1, the first difference, and 'dropout'."""
    gpt = ROOT / "recipes" / "gpt.yaml"
    ok = launcher("verify", gpt, *CPU_GPT, "--layouts", "1", "ddp:2", "fsdp:2,tp:1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "every layout equals 1 within rtol 1e-05 over 3 steps" in ok.stdout
    rows = [line.split() for line in ok.stdout.splitlines() if line.startswith("  ddp:2") or line.startswith("  fsdp")]
    assert len(rows) == 2 and all(r[-1] == "yes" for r in rows), ok.stdout

    bad = launcher("verify", gpt, *CPU_GPT, "model.dropout=0.1", "--layouts", "1", "ddp:2", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("verify: ddp:2 differs from the reference first at step 1"), last
    assert "dropout is on" in last and "(p=0.1)" in last
    assert not list(tmp_path.iterdir()), "verify leaves its run directories behind"


def test_verify_refuses_a_loss_that_sums_before_training_and_says_so(tmp_path):
    """reduction=sum would make the layouts differ (a window's micro-batches weigh by their sample
    counts, so a sum counts them twice); launcher check refuses it, and so does verify, in its one line,
    exit 2, before any layout trains."""
    recipe = write_recipe(
        tmp_path / "sum.yaml", recipe_dict(**{"loss.reduction": "sum", "run.dir": str(tmp_path / "r")})
    )
    proc = launcher("verify", recipe, "--layouts", "1", "ddp:2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: loss.reduction: 'sum' is not a mean"), proc.stderr
    assert "training at" not in proc.stdout


def test_verify_refuses_a_layout_it_cannot_read_in_one_line():
    proc = launcher("verify", ROOT / "recipes" / "gpt.yaml", "--layouts", "1", "dp:2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --layouts: 'dp:2': each part is ddp:N, fsdp:N, hsdp:N, tp:N, cp:N or pp:N (N ranks), joined by "
        "commas; or 1 for one process"
    ]


def test_verify_names_batchnorm_config_dropout_and_an_unreduced_loss_before_training(tmp_path):
    """The causes it sees in the recipe and the model alone (no run): the shipped ResNet-18's BatchNorm
    at a data-parallel layout, a transformers model's dropout."""
    from launcher.commands.verify import parse_layout, static_causes
    from launcher.recipe import schema

    resnet = schema.load(ROOT / "recipes" / "cifar10_resnet18.yaml")
    causes = static_causes(resnet, [parse_layout("1"), parse_layout("ddp:2")])
    assert any(c.startswith("BatchNorm (bn1, ...)") for c in causes), causes
    assert not any("BatchNorm" in c for c in static_causes(resnet, [parse_layout("1"), parse_layout("tp:2")]))

    gpt2 = {
        "_component_": "launcher.models.hf.causal_lm",
        "config": {"_component_": "transformers.GPT2Config", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 32},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(model=gpt2))
    causes = static_causes(schema.load(path), [parse_layout("1"), parse_layout("ddp:2")])
    assert any(c.startswith("dropout is on (transformer.drop (p=0.1)") for c in causes), causes


def test_a_layout_names_every_dimension_its_ranks_read_one_batch_over():
    """cp:N and pp:N (context and pipeline parallelism) are layouts too; each layout sets tp, cp and
    pp (1 where it does not name them), so a recipe's own sizes do not leak into the one process."""
    from launcher.commands.verify import parse_layout

    layout = parse_layout("fsdp:2,cp:2")
    assert (layout.nproc, layout.dp) == (4, 2)
    assert set(layout.overrides) == {
        "dist.strategy=fsdp",
        "dist.tensor_parallel=1",
        "dist.context_parallel=2",
        "dist.pipeline_parallel=1",
    }
    one = parse_layout("1")
    assert (one.nproc, one.dp) == (1, 1) and "dist.context_parallel=1" in one.overrides
    assert "dist.pipeline_parallel=2" in parse_layout("pp:2").overrides
