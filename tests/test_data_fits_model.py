"""Data that does not fit the model (ids beyond its vocabulary, sequences beyond its positions, a
padding id that is no token, lengths that are no lengths, samples that need padding without a
collate) is one line at `launcher check` and at `launcher run`, before any step: not an IndexError
on every rank at step 1."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import launcher, write_recipe
from hfkit import lm_recipe, make_tokenizer

TOKEN_FILE_GPT = {
    "name": "tok",
    "model": {
        "_component_": "launcher.models.GPT",
        "vocab_size": 64,
        "seq_len": 16,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
    },
    "data": {"train": {"_component_": "launcher.datasets.token_file.TokenFile", "seq_len": 16}, "batch_size": 4},
    "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
    "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1},
    "train": {"max_steps": 1},
}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    make_tokenizer(tmp / "tokenizer")
    np.arange(1000, dtype=np.uint16).__mod__(64).astype(np.uint16).tofile(tmp / "ok.bin")
    big = np.arange(1000, dtype=np.uint16) % 64
    big[777] = 64
    big.tofile(tmp / "big.bin")
    return tmp


def both(tmp_path, recipe):
    """The one error line of `launcher check` and of `launcher run` (which must agree)."""
    path = write_recipe(tmp_path / "r.yaml", recipe)
    lines = []
    for command in ("check", "run"):
        proc = launcher(command, path)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1, proc.stderr[-3000:]
        lines.append(said[0])
    assert lines[0] == lines[1]
    return lines[0]


def token_file(material, tmp_path, name, **changes):
    recipe = {**TOKEN_FILE_GPT, "run": {"dir": str(tmp_path / "run")}}
    recipe["data"] = {**recipe["data"], "train": {**recipe["data"]["train"], "path": str(material / name), **changes}}
    return recipe


def test_a_token_file_with_ids_beyond_the_vocabulary(material, tmp_path):
    line = both(tmp_path, token_file(material, tmp_path, "big.bin"))
    assert line.startswith("error: data.train:") and "holds token id 64, beyond the model's vocabulary of 64" in line


def test_a_token_file_is_scanned_once_per_node_and_refused_on_every_rank(material, tmp_path):
    """Its largest id is read by local rank 0 alone (the others take it from the store), and a file
    beyond the vocabulary is the same one line at 2 ranks."""
    shutil.copyfile(material / "ok.bin", tmp_path / "ok.bin")
    recipe = token_file(material, tmp_path, "ok.bin", path=str(tmp_path / "ok.bin"))
    recipe["data"]["train"]["_component_"] = "testkit.ScanCountingTokenFile"
    proc = launcher("run", "--nproc", "2", write_recipe(tmp_path / "ok.yaml", recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "ok.bin.scans").read_text().splitlines()) == 1
    proc = launcher(
        "run", "--nproc", "2", write_recipe(tmp_path / "big.yaml", token_file(material, tmp_path, "big.bin"))
    )
    said = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(said) == 1 and "holds token id 64" in said[0], proc.stderr[-3000:]


def test_a_token_file_read_with_the_wrong_dtype(material, tmp_path):
    line = both(tmp_path, token_file(material, tmp_path, "ok.bin", dtype="uint32"))
    assert "beyond the model's vocabulary" in line and "check the file's dtype" in line


def test_a_window_longer_than_the_models_positions(material, tmp_path):
    line = both(tmp_path, token_file(material, tmp_path, "ok.bin", seq_len=32))
    assert line.startswith("error: data.train: samples of up to 32 tokens, but the model has 16 positions")


@pytest.mark.parametrize("key, value", [("seq_len", 0), ("seq_len", -2), ("samples", -1)])
def test_token_file_lengths(material, tmp_path, key, value):
    line = both(tmp_path, token_file(material, tmp_path, "ok.bin", windows="random", **{key: value}))
    assert line.startswith(f"error: data.train.{key}: {value} is not a length"), line


def test_a_tokenizer_larger_than_the_models_vocabulary(material, tmp_path):
    recipe = lm_recipe(material, tmp_path / "run")
    recipe["model"]["config"]["vocab_size"] = 40  # the tokenizer has 63 tokens
    line = both(tmp_path, recipe)
    assert "the tokenizer has 63 tokens but the model's vocabulary is 40" in line


def test_max_length_or_pack_beyond_the_models_positions(material, tmp_path):
    for key in ("max_length", "pack"):
        line = both(tmp_path, lm_recipe(material, tmp_path / "run", **{key: 100}))
        assert "samples of up to 100 tokens, but the model has 64 positions" in line, line


def test_a_padding_id_outside_the_vocabulary(material, tmp_path):
    recipe = lm_recipe(material, tmp_path / "run")
    recipe["data"]["collate"]["pad_id"] = 64
    assert "data.collate.pad_id: 64 is not a token" in both(tmp_path, recipe)


def test_padded_documents_without_a_collate(material, tmp_path):
    recipe = lm_recipe(material, tmp_path / "run")
    del recipe["data"]["collate"]
    assert "add data.collate: {_component_: launcher.collate.PadToLongest}" in both(tmp_path, recipe)


def test_units_that_split_tied_parameters_name_the_key(material, tmp_path):
    recipe = lm_recipe(material, tmp_path / "run")
    recipe["dist"] = {"strategy": "fsdp", "fsdp": {"units": ["GPT2Model"]}}  # the tied head stays outside
    line = both(tmp_path, recipe)
    assert line.startswith("error: dist.fsdp.units: transformer.wte.weight is tied to lm_head.weight"), line


def test_a_stream_that_yields_nothing_names_data_train(tmp_path):
    from conftest import recipe_dict

    changes = {"data.train": {"_component_": "testkit.NumberedStream", "size": 0}, "data.val": None}
    changes |= {"train.epochs": None, "train.max_steps": 2, "loss": {"_component_": "torch.nn.CrossEntropyLoss"}}
    line = both(tmp_path, recipe_dict(**{"run.dir": str(tmp_path / "run"), **changes}))
    assert line == "error: data.train: the stream NumberedStream yields no sample; point it at data"


def test_an_interrupted_hf_export_leaves_the_previous_one_whole(tmp_path):
    import transformers

    from hfkit import tiny_gpt2
    from launcher.models import hf

    config = {k: v for k, v in tiny_gpt2()["config"].items() if k != "_component_"}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    out = tmp_path / "hf"
    hf.export(model, model.state_dict(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies_after_the_config(directory, **kwargs):  # a kill between config.json and the weights
        model.config.save_pretrained(directory)
        raise KeyboardInterrupt

    model.save_pretrained = dies_after_the_config
    with pytest.raises(KeyboardInterrupt):
        hf.export(model, model.state_dict(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_transformers_recipe_is_checked_without_transformers_loss_type_noise(material, tmp_path):
    proc = launcher("check", write_recipe(tmp_path / "r.yaml", lm_recipe(material, tmp_path / "run")))
    assert proc.returncode == 0, proc.stderr
    assert "loss_type" not in proc.stderr, proc.stderr
