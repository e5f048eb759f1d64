"""Hugging Face models, tokenizers and datasets, and the token-exact loss (issue #14): a tiny GPT-2
(`transformers`, 2 layers, random weights) fine-tuned on padded documents of 2 to 30 words, written
by the test with a tokenizer the test trains (hfkit). Real processes and gloo; nothing downloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import DELETE, assert_close_rel, changed, launcher, load_weights, worker_env, write_recipe
from hfkit import lm_recipe, tiny_gpt2
from launcher.parallel.sharding import MIN_TORCH, torch_version
from launcher.recipe.schema import validate

LIBRARY_BARS = re.compile(r"Generating train split|tokenizing:|Loading weights|Writing model shards|it/s\]")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """The tokenizer and the JSON lines files, shared by this module's runs."""
    tmp = tmp_path_factory.mktemp("hf")
    lm_recipe(tmp, tmp / "unused")
    return tmp


def run(material, tmp_path, name, nproc=None, expect=0, **changes):
    run_dir = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", changed(lm_recipe(material, run_dir), **changes))
    args = ["run", *(["--nproc", str(nproc)] if nproc else []), path]
    proc = launcher(*args, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    # off a terminal, the libraries' bars (datasets' splits and map, transformers' shard writing) are off
    assert not LIBRARY_BARS.search(proc.stderr), proc.stderr
    return run_dir if expect == 0 else proc


def rows(run_dir, key):
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def one_process(material, tmp_path_factory):
    """The whole global batch (16 padded documents) in one micro-batch of one process."""
    return run(material, tmp_path_factory.mktemp("ref"), "big", **{"data.batch_size": 16})


def test_padded_token_loss_on_2_ranks_with_accumulation_equals_one_process(material, tmp_path, one_process):
    """2 ranks x micro-batch 4 x accumulation 2, padded to each micro-batch's longest document: the
    update is the mean over the window's valid tokens, as one process with the whole batch has it."""
    ranks = run(material, tmp_path, "w2", nproc=2)
    assert_close_rel(load_weights(ranks), load_weights(one_process), rtol=1e-6)
    for key in ("loss", "val_loss"):
        assert rows(ranks, key) == pytest.approx(rows(one_process, key), rel=1e-6), key
    # weighting each micro-batch's mean by its samples instead (the default for sample losses) is
    # not the same update: documents differ in length, so this is a test that can fail
    samples = run(material, tmp_path, "samples", nproc=2, **{"train.loss_mean_over": "samples"})
    with pytest.raises(AssertionError, match="relative difference"):
        assert_close_rel(load_weights(samples), load_weights(one_process), rtol=1e-6)


@pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
def test_fsdp_per_gpt2_block_with_token_loss_equals_one_process(material, tmp_path, one_process):
    changes = {"dist.strategy": "fsdp", "dist.fsdp.units": ["GPT2Block"]}
    assert_close_rel(load_weights(run(material, tmp_path, "fsdp", nproc=2, **changes)), load_weights(one_process))


def test_checkpointing_every_gpt2_block_trains_to_the_same_weights(material, tmp_path):
    plain = run(material, tmp_path, "plain", **{"train.epochs": 1})
    ac = run(material, tmp_path, "ac", **{"train.epochs": 1, "train.activation_checkpointing.modules": ["GPT2Block"]})
    assert_close_rel(load_weights(ac), load_weights(plain), rtol=1e-6)


def test_save_pretrained_loads_with_from_pretrained_and_equals_model_pt(material, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = run(material, tmp_path, "export", **{"train.epochs": 1})
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True)
    assert list((run_dir / "hf").glob("*.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items()}
    weights = load_weights(run_dir)
    assert loaded.keys() == weights.keys()
    for k in weights:
        assert torch.equal(loaded[k], weights[k]), k
    # the data's tokenizer is saved beside it: from_pretrained and generate work at once
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf", local_files_only=True)
    source = AutoTokenizer.from_pretrained(material / "tokenizer", local_files_only=True)
    assert len(tokenizer) == len(source) > 1 and tokenizer.eos_token == source.eos_token
    ids = tokenizer("w1 w8 w3", return_tensors="pt")["input_ids"]
    assert ids.tolist() == source("w1 w8 w3", return_tensors="pt")["input_ids"].tolist()
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    # and a recipe can start from it: `pretrained` (local files only)
    again = run(
        material,
        tmp_path,
        "again",
        **{
            "train.epochs": 1,
            "model": {"_component_": "launcher.models.hf.causal_lm", "pretrained": str(run_dir / "hf")},
        },
    )
    assert rows(again, "loss")[0] < rows(run_dir, "loss")[0]


@pytest.mark.parametrize(
    "changes,expected",
    [
        (
            {"model": {"_component_": "launcher.models.hf.causal_lm", "pretrained": "/no/such/model"}},
            "model.pretrained: /no/such/model does not exist: name a local directory written by save_pretrained",
        ),
        (
            {"train.activation_checkpointing.modules": ["GPT2Blok"]},
            "train.activation_checkpointing.modules: no module of class GPT2Blok; did you mean 'GPT2Block'?",
        ),
    ],
)
def test_hf_mistakes_are_one_line(material, tmp_path, changes, expected):
    proc = run(material, tmp_path, "bad", expect=2, **changes)
    assert (
        proc.stderr.strip().splitlines()[-1] == f"error: {expected}" or expected in proc.stderr.strip().splitlines()[-1]
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_safetensors_file_in_a_pretrained_directory_is_named(material, tmp_path, damage):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {k: v for k, v in tiny_gpt2()["config"].items() if k != "_component_"}
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(tmp_path / "pre")
    weights = tmp_path / "pre" / "model.safetensors"
    data = weights.read_bytes()
    # a copy cut short, or a header overwritten; both check and run name the file, not transformers' internals
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    model = {"_component_": "launcher.models.hf.causal_lm", "pretrained": str(tmp_path / "pre")}
    path = write_recipe(tmp_path / "r.yaml", changed(lm_recipe(material, tmp_path / "run"), model=model))
    for command in ("check", "run"):
        proc = launcher(command, path)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"error: model.pretrained: {weights} is damaged ("), last
        assert last.endswith("copy, download or save_pretrained it again") and "meta device" not in last, last


def test_a_broken_json_lines_file_is_named_with_its_line(material, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"text": "w3 w4"}\n{"text": "w5\n')
    proc = run(material, tmp_path, "badfile", expect=2, **{"data.train.files": str(bad)})
    last = proc.stderr.strip().splitlines()[-1]
    assert f"data.train.files: {bad}:3: not valid JSON lines" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_recipe_needing_a_missing_extra_names_it(material, tmp_path, monkeypatch):
    """transformers made unimportable in this process (None in sys.modules: import raises)."""
    from launcher.data.builders import build_model
    from launcher.errors import RecipeError

    monkeypatch.setitem(sys.modules, "transformers", None)
    recipe = validate(lm_recipe(material, tmp_path / "run"))
    with pytest.raises(RecipeError, match=r"pip install 'launcher\[hf\]'") as e:
        build_model(recipe)
    assert e.value.key.startswith("model")


def test_streamed_documents_on_2_ranks_with_workers_equal_one_process(material, tmp_path):
    """The documents streamed (datasets' streaming mode, tokenized as read), 2 ranks x accumulation 2
    with 2 DataLoader workers each, against one process with the whole batch: streaming and the
    token-exact loss together."""
    streamed = {
        "data.train._component_": "launcher.datasets.tokenized.StreamedText",
        "data.train.cache_dir": DELETE,
        "train.epochs": None,
        "train.max_steps": 5,  # 80 documents: the 37-document stream's 3rd pass ends inside step 5
    }
    big = run(material, tmp_path, "big", **{**streamed, "data.batch_size": 16})
    ranks = run(material, tmp_path, "w2", nproc=2, **{**streamed, "data.num_workers": 2})
    assert_close_rel(load_weights(ranks), load_weights(big), rtol=1e-6)
    assert rows(ranks, "loss") == pytest.approx(rows(big, "loss"), rel=1e-6)


def test_text_formats_packing_and_the_tokenization_cache(material, tmp_path):
    """.jsonl, .txt and .parquet give the same documents; `pack` concatenates them (end-of-text
    between) into equal samples; a second build reads the cache, and other arguments tokenize anew."""
    from transformers import AutoTokenizer

    from datasets import Dataset as HFDataset
    from launcher.datasets.tokenized import TokenizedText

    docs = [json.loads(line)["text"] for line in (material / "train.jsonl").read_text().splitlines()]
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    HFDataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    cache = tmp_path / "cache"
    tok = AutoTokenizer.from_pretrained(material / "tokenizer", local_files_only=True)
    expected = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    for name in ("train.jsonl", "d.txt", "d.parquet"):
        folder = material if name == "train.jsonl" else tmp_path
        data = TokenizedText(str(folder / name), str(material / "tokenizer"), cache_dir=str(cache))
        assert [data[i]["input_ids"].tolist() for i in range(len(data))] == expected, name
    files = set(cache.rglob("*.arrow"))
    TokenizedText(str(tmp_path / "d.txt"), str(material / "tokenizer"), cache_dir=str(cache))
    assert set(cache.rglob("*.arrow")) == files  # read from the cache, not tokenized again
    packed = TokenizedText(str(tmp_path / "d.txt"), str(material / "tokenizer"), pack=16, cache_dir=str(cache))
    assert set(cache.rglob("*.arrow")) > files
    stream = [t for ids in expected for t in [*ids, tok.eos_token_id]]
    assert len(packed) == len(stream) // 16
    assert [t for i in range(len(packed)) for t in packed[i]["input_ids"].tolist()] == stream[: len(packed) * 16]


def test_a_missing_extra_is_one_line_and_exit_2_from_the_command_line(material, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", lm_recipe(material, tmp_path / "run"))
    code = "import sys; sys.modules['transformers'] = None; from launcher.commands import cli; "
    code += "sys.exit(cli.main(['check', sys.argv[1]]))"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("install the [hf] extra: pip install 'launcher[hf]'")
    assert "Traceback" not in proc.stderr


def test_a_token_loss_component_over_padded_tuples_is_exact_with_tokens_not_samples(tmp_path):
    """The built-in GPT and TokenCrossEntropy on (inputs, targets) tuples with -100 padding: with
    `loss_mean_over: tokens` 2 ranks x accumulation 2 == one process; by samples they differ."""
    from conftest import recipe_dict

    gpt = {"_component_": "launcher.models.GPT", "vocab_size": 32, "seq_len": 16, "d_model": 16, "n_layers": 1}
    base = {
        "model": {**gpt, "n_heads": 2},
        "data.train": {"_component_": "testkit.PaddedTokens"},
        "data.val": {"_component_": "testkit.PaddedTokens", "size": 9, "seed": 1},
        "loss": {"_component_": "launcher.losses.TokenCrossEntropy"},
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
    }

    def go(name, nproc=None, **changes):
        r = recipe_dict(**{**base, "run.dir": str(tmp_path / name), **changes})
        proc = launcher("run", *(["--nproc", str(nproc)] if nproc else []), write_recipe(tmp_path / f"{name}.yaml", r))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_weights(tmp_path / name)

    tokens = {"train.loss_mean_over": "tokens"}
    one = go("one", **{**tokens, "data.batch_size": 16})
    assert_close_rel(go("w2", nproc=2, **tokens), one, rtol=1e-6)
    with pytest.raises(AssertionError, match="relative difference"):
        assert_close_rel(go("samples", nproc=2), one, rtol=1e-6)


def test_a_token_exact_run_resumed_from_its_checkpoint_ends_bit_identical(material, tmp_path):
    """3 steps, then the same run directory continued to the end: as the uninterrupted run."""
    whole = run(material, tmp_path, "whole")
    part = tmp_path / "part"
    recipe = lm_recipe(material, part)
    write_recipe(tmp_path / "part3.yaml", changed(recipe, **{"train.max_steps": 3}))
    assert launcher("run", tmp_path / "part3.yaml").returncode == 0
    proc = launcher("run", write_recipe(tmp_path / "part.yaml", recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_weights(part), load_weights(whole)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert rows(part, "loss") == rows(whole, "loss")


@pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
def test_meta_init_of_a_sharded_transformers_model_initialises_it_as_transformers_does(material, tmp_path):
    """Built on the meta device, sharded per GPT2Block, then the model's own init_weights per shard:
    GPT-2's N(0, 0.02) weights, the head still tied to the embedding, a first loss near ln(64)."""
    changes = {"dist.strategy": "fsdp", "dist.fsdp.units": ["GPT2Block"], "dist.fsdp.meta_init": True}
    run_dir = run(material, tmp_path, "meta", nproc=2, **{**changes, "train.epochs": 1})
    w = load_weights(run_dir)
    assert torch.equal(w["lm_head.weight"], w["transformer.wte.weight"])
    assert 0.015 < float(w["transformer.h.0.mlp.c_fc.weight"].std()) < 0.03
    assert abs(rows(run_dir, "loss")[0] - 4.159) < 0.1


def test_streamed_text_checks_its_first_document_in_one_line(material, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"\n{"text": "w3"}\n')
    base = {"data.train._component_": "launcher.datasets.tokenized.StreamedText", "data.train.cache_dir": DELETE}
    base |= {"train.epochs": None, "train.max_steps": 2}
    proc = run(material, tmp_path, "key", expect=2, **{**base, "data.train.text_key": "body"})
    assert "train.jsonl:1: no 'body' field" in proc.stderr.strip().splitlines()[-1]
    proc = run(material, tmp_path, "line", expect=2, **{**base, "data.train.files": str(bad)})
    assert f"data.train.files: {bad}:1: not valid JSON lines" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("source", ["directory", "tokenizer.json"])
def test_the_tokenizer_saved_beside_an_export_encodes_as_the_one_read(material, tmp_path, source):
    """What the export writes beside the model (a directory's files, or a bare tokenizer.json saved as
    a PreTrainedTokenizerFast) loads with AutoTokenizer and encodes as the data was encoded."""
    from transformers import AutoTokenizer

    from launcher.datasets.tokenized import load_tokenizer

    spec = material / "tokenizer" if source == "directory" else material / "tokenizer" / "tokenizer.json"
    tokenizer = load_tokenizer(str(spec))
    tokenizer.save_into(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = ["w1 w8 w3", "w5"]
    assert saved(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert saved.eos_token_id == tokenizer.eos


LORA = {"_component_": "peft.LoraConfig", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}


def test_lora_on_2_ranks_equals_one_process_and_exports_the_adapter_and_the_merged_model(material, tmp_path):
    """model.peft (a real peft.LoraConfig): only the adapters train; 2 ranks under ddp, and under
    fsdp with activation checkpointing per block, equal one process with the whole batch; hf/ holds
    the adapter (PeftModel.from_pretrained), hf-merged/ the merged model, and both compute alike."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    lora = {"model.peft": {**LORA, "lora_dropout": 0.0}, "train.epochs": None, "train.max_steps": 3}
    one = run(material, tmp_path, "one", **lora, **{"data.batch_size": 16})
    ddp = run(material, tmp_path, "ddp", nproc=2, **lora)
    fsdp_ac = {"dist.strategy": "fsdp", "train.activation_checkpointing.modules": ["GPT2Block"]}
    sharded = run(material, tmp_path, "fsdp", nproc=2, **lora, **fsdp_ac)
    for other in (ddp, sharded):
        assert_close_rel(load_weights(other), load_weights(one), rtol=1e-5)
    weights = load_weights(one)
    assert any("lora_A" in k for k in weights) and (one / "hf" / "adapter_config.json").is_file()
    # the trained model: peft's own wrapping of the base, every weight (adapters too) from model.pt
    config = {k: v for k, v in tiny_gpt2()["config"].items() if k != "_component_"}

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_config(GPT2Config(**config))

    trained = get_peft_model(base(), LoraConfig(**{k: v for k, v in LORA.items() if k != "_component_"}))
    trained.load_state_dict(weights)
    # hf/: the base as it was built (its frozen weights in model.pt), with the adapter read from hf/
    prefix = "base_model.model."
    frozen = {k[len(prefix) :].replace(".base_layer", ""): v for k, v in weights.items() if "lora_" not in k}
    plain, untouched = base(), base()  # peft adapts the model it is given in place
    plain.load_state_dict(frozen)
    untouched.load_state_dict(frozen)
    adapted = PeftModel.from_pretrained(plain, one / "hf")
    merged = AutoModelForCausalLM.from_pretrained(one / "hf-merged", local_files_only=True)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(ids).logits
        assert torch.allclose(adapted.eval()(ids).logits, expected, atol=1e-5)
        assert torch.allclose(merged.eval()(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(expected, untouched.eval()(ids).logits, atol=1e-4)  # the adapters did train


def test_check_prints_the_trainable_parameters_of_an_adapted_model(material, tmp_path):
    from hfkit import lm_recipe

    path = write_recipe(tmp_path / "r.yaml", changed(lm_recipe(material, tmp_path / "run"), **{"model.peft": LORA}))
    out = launcher("check", path, check=True).stdout
    found = re.search(r"^parameters +([\d,]+), of which ([\d,]+) train \([\d.]+%\)$", out, re.M)
    assert found, out
    total, trained = (int(n.replace(",", "")) for n in found.groups())
    # the memory plan charges gradients and optimizer state (SGD with momentum: 1) to the adapters only
    mib = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}
    plan = re.search(r"^per rank, ddp .*gradients ([\d.]+) (\w+) \+ optimizer state ([\d.]+) (\w+)\)$", out, re.M)
    assert plan, out
    grads, moments = float(plan[1]) * mib[plan[2]], float(plan[3]) * mib[plan[4]]
    assert grads == pytest.approx(trained * 4 / 2**20, rel=0.01) and grads < total * 4 / 2**20 / 2
    assert moments == pytest.approx(grads, rel=0.01)


@pytest.mark.parametrize(
    "model_type,target,tying",
    [
        ("gpt2", "wte", {}),
        ("gpt2", "lm_head", {}),
        ("llama", "embed_tokens", {}),
        ("llama", "lm_head", {}),
        ("gpt2", "lm_head", {"ensure_weight_tying": True}),  # peft adapts the embedding too, tied to the head's
    ],
)
def test_lora_on_a_tied_embedding_or_head_exports_a_merged_model_with_the_trained_logits(
    tmp_path, model_type, target, tying
):
    """The embedding and the head share one matrix (GPT-2's, a Llama's with tie_word_embeddings):
    merging an adapter into it changed the other as well (logits off by several); hf-merged/ now
    holds an embedding and a head of their own, each as the trained model computed with it."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from launcher.models import hf

    if model_type == "gpt2":
        config = GPT2Config(**{k: v for k, v in tiny_gpt2()["config"].items() if k != "_component_"})
    else:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        config = LlamaConfig(vocab_size=64, num_key_value_heads=1, tie_word_embeddings=True, **small)
    torch.manual_seed(0)
    trained = hf.with_adapters(
        AutoModelForCausalLM.from_config(config), LoraConfig(r=4, lora_alpha=8, target_modules=[target], **tying)
    )
    base = trained.get_base_model()
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # tied, one side adapted
    with torch.no_grad():  # as if trained: peft starts each adapter as a zero change
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    weights = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    whole = hf.merged(trained, weights)
    hf.export(whole, whole.state_dict(), tmp_path / "hf-merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged", local_files_only=True)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(ids).logits
        torch.testing.assert_close(merged.eval()(ids).logits, expected)
        with trained.disable_adapter():  # the adapter changes the logits: a merge that dropped it would fail
            assert not torch.allclose(trained(ids).logits, expected, atol=1e-3)
    # and it says so: loaded elsewhere, the head is not tied back to the embedding
    assert json.loads((tmp_path / "hf-merged" / "config.json").read_text())["tie_word_embeddings"] is False


def _saved_gpt2(directory, **config_changes):
    """A tiny GPT-2 written by save_pretrained, its config.json then edited."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(**{k: v for k, v in tiny_gpt2()["config"].items() if k != "_component_"})
    ).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
    return directory


@pytest.mark.parametrize(
    "changes,expected",
    [
        # another architecture's config.json: nothing loads, and the run trained a random BertLMHeadModel
        (
            {"model_type": "bert", "architectures": None},
            r"\(BertLMHeadModel, model_type bert\): \d+ of the model's missing from the files "
            r"\(bert\.embeddings\.LayerNorm\.bias, .*; 28 in the files that the model has no place for "
            r"\(transformer\.h\.0\.attn\.c_attn\.bias, ",
        ),
        # other sizes: transformers' 20-line table and a traceback
        (
            {"n_embd": 64},
            r"\(GPT2LMHeadModel, model_type gpt2\): 28 of another shape in the files than by config\.json "
            r"\(transformer\.h\.0\.attn\.c_attn\.bias \[96\] against \[192\], ",
        ),
    ],
)
def test_a_config_json_that_does_not_fit_its_weights_is_one_line_at_check_and_run(
    material, tmp_path, changes, expected
):
    pre = _saved_gpt2(tmp_path / "pre", **changes)
    model = {"_component_": "launcher.models.hf.causal_lm", "pretrained": str(pre)}
    path = write_recipe(tmp_path / "r.yaml", changed(lm_recipe(material, tmp_path / "run"), model=model))
    for command in ("check", "run"):
        proc = launcher(command, path)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2, (command, proc.stderr[-3000:])
        assert last.startswith(f"error: model.pretrained: the weights in {pre} do not fit the model its config.json"), (
            last
        )
        assert re.search(expected, last), last
        assert last.endswith("(save_pretrained writes both), or fix config.json"), last
        assert "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("fault", ["missing", "unexpected"])
def test_weights_missing_from_a_pretrained_directory_or_not_the_models_are_named(tmp_path, fault):
    """Some keys only: `launcher check` reads headers and leaves these to the run, where transformers
    says what it loaded (knowing its renames, and the head tied to the embedding that is not saved)."""
    from safetensors.torch import load_file, save_file

    from launcher.errors import ArgumentError
    from launcher.models import hf

    pre = _saved_gpt2(tmp_path / "pre")
    # another file beside the weights, which transformers does not read (Mistral ships consolidated.safetensors)
    save_file({"transformer.wte.weight": torch.zeros(3, 3)}, pre / "consolidated.safetensors")
    with torch.device("meta"):
        hf.causal_lm(pretrained=str(pre))
    hf.causal_lm(pretrained=str(pre))  # as saved: lm_head.weight is tied, not in the file, and not missing
    file = pre / "model.safetensors"
    weights = load_file(file)
    if fault == "missing":
        del weights["transformer.ln_f.weight"]
    else:
        weights["transformer.h.0.extra.weight"] = torch.zeros(2)
    save_file(weights, file, metadata={"format": "pt"})
    with torch.device("meta"):
        hf.causal_lm(pretrained=str(pre))  # check: the headers agree on everything they can tell
    with pytest.raises(ArgumentError) as e:
        hf.causal_lm(pretrained=str(pre))
    key = "transformer.ln_f.weight" if fault == "missing" else "transformer.h.0.extra.weight"
    what = (
        "of the model's missing from the files"
        if fault == "missing"
        else "in the files that the model has no place for"
    )
    assert e.value.argument == "pretrained" and f"1 {what} ({key})" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "variables,arguments,expected",
    [
        # datasets keeps its Arrow files under HF_HOME: the error named data.train and the path alone
        ({"HF_HOME": "{blocked}/hf"}, {}, "HF_HOME: the Hugging Face datasets cache {blocked}/hf/datasets (HF_HOME="),
        (
            {"HF_DATASETS_CACHE": "{blocked}/ds"},
            {},
            "HF_DATASETS_CACHE: the Hugging Face datasets cache {blocked}/ds (",
        ),
        ({}, {"cache_dir": "{blocked}/c"}, "data.train.cache_dir: {blocked}/c cannot be written (NotADirectoryError"),
        # a hub id downloads into the hub's cache when the hub is on (it is not reached: refused first)
        (
            {"HF_HOME": "{blocked}/hf", "HF_HUB_OFFLINE": None},
            {"cache_dir": "{cache}", "tokenizer": "someone/tokenizer"},
            "HF_HOME: the Hugging Face hub cache {blocked}/hf/hub (HF_HOME={blocked}/hf), which the hub id "
            "someone/tokenizer writes into",
        ),
    ],
)
def test_a_hugging_face_cache_that_cannot_be_written_names_its_variable_at_check_and_run(
    material, tmp_path, variables, arguments, expected
):
    blocked = tmp_path / "a-file"  # a directory below a file cannot be made, whoever runs the test
    blocked.write_text("")
    fill = {"blocked": blocked, "cache": tmp_path / "cache"}
    recipe = lm_recipe(material, tmp_path / "run")
    for split in ("train", "val"):
        recipe["data"][split].pop("cache_dir")  # datasets' own cache, as a recipe has it by default
        recipe["data"][split].update({k: v.format(**fill) for k, v in arguments.items()})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = worker_env(**{k: v.format(**fill) for k, v in variables.items() if v is not None})
    for name in [k for k, v in variables.items() if v is None]:
        env.pop(name, None)
    for command in ("check", "run"):
        proc = launcher(command, path, env=env)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"error: {expected.format(**fill)}"), (command, last)
        assert "Traceback" not in proc.stderr and "data.train.files" not in last, proc.stderr[-2000:]


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template,end", [(QWEN_TEMPLATE, "<|im_end|>"), ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", None)]
)
def test_the_end_of_turn_token_is_read_from_the_chat_template(tmp_path, template, end):
    """Qwen's turns end with <|im_end|> (eos is <|endoftext|>): the export's generation stops there
    too; a template that writes no special token after an answer adds no stop."""
    from transformers import AutoTokenizer

    from launcher.datasets import examples
    from launcher.models import hf

    tok = examples._tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "source")
    # loaded as the launcher loads it (local files only), and saved beside the model as an export does
    tok = AutoTokenizer.from_pretrained(tmp_path / "source", local_files_only=True)
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}))
    hf.portable(tmp_path, torch.nn.Linear(1, 1))
    stops = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert stops == ([tok.eos_token_id, tok.convert_tokens_to_ids(end)] if end else tok.eos_token_id), stops
    assert not {"local_files_only", "is_local"} & set(json.loads((tmp_path / "tokenizer_config.json").read_text()))
