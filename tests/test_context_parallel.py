"""Context parallelism (issue #33): every sample's sequence split over the ranks of a group, attention
all-gathering the keys and values. The built-in GPT and a tiny transformers Llama (grouped-query
attention, rotary positions) equal one process with the same global batch, to 1e-5 (weights, the
logged loss and gradient norm, the validation loss), at cp 2 composed with ddp, fsdp, tensor
parallelism and pipeline stages, on fixed-length sequences, padded documents and packed
conversations with their document masks; a checkpoint resumes at another cp size. Real processes,
gloo; SGD, fp32, no dropout.

The unit tests pin the pieces: the head-and-tail layout, the mask (a query's keys are its
document's, by global index), and the split of a batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ROOT, assert_close_rel, launcher, load_weights
from launcher.errors import RecipeError
from launcher.models.gpt import document_causal_mask
from launcher.parallel.context import Context, chunk_index
from launcher.parallel.context_batches import split
from launcher.parallel.sharding import MIN_TORCH, torch_version
from testkit import SGD_4_STEPS, gpt_bytes

needs_mesh = pytest.mark.skipif(torch_version() < MIN_TORCH, reason="context parallelism needs torch >= 2.6")

# the built-in GPT on fixed-length byte sequences (tuples, the recipe's token loss)
GPT = [*gpt_bytes(2), "train.loss_mean_over=tokens"]  # a sample's mean needs all its tokens
# a Llama with grouped-query attention on the arithmetic documents (padded, the model's own loss)
LLAMA = [
    "model.config={_component_: transformers.LlamaConfig, vocab_size: 32, hidden_size: 32, intermediate_size: 64, "
    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 32, "
    "tie_word_embeddings: false, bos_token_id: 2, eos_token_id: 2}",
]
# conversations (about 20 tokens each) packed into samples of 64 tokens, with their document masks
PACKED = [
    "data.train={_component_: launcher.datasets.examples.arithmetic_chat, split: train, max_length: null, pack: 64}"
]
PACKED_GPT = [
    "model={_component_: launcher.models.GPT, vocab_size: 32, seq_len: 64, d_model: 32, n_layers: 2, n_heads: 4}",
    "loss=null",  # the GPT computes its own next-token loss from the labels
    "data.collate={_component_: launcher.collate.PadToLongest, pad_id: 0}",
    "data.val={_component_: launcher.datasets.examples.arithmetic_text, split: val}",
]
SHARED = [*SGD_4_STEPS, "train.epochs=null"]
MODELS = {
    "gpt": ("gpt.yaml", GPT),
    "llama": ("hf_causal_lm.yaml", LLAMA),
    "gpt-packed": ("hf_causal_lm.yaml", PACKED + PACKED_GPT),
    "llama-packed": ("hf_causal_lm.yaml", [*LLAMA, "model.config.max_position_embeddings=64", *PACKED]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where every run of this module runs: the arithmetic examples are written there once."""
    return tmp_path_factory.mktemp("cp-data")


def run(run_dir, model, *changes, nproc=None, cwd=None):
    recipe, tiny = MODELS[model]
    args = ["run", *(["--nproc", str(nproc)] if nproc else []), ROOT / "recipes" / recipe]
    proc = launcher(*args, f"run.dir={run_dir}", *SHARED, *tiny, *changes, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def rows(run_dir):
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (
        [r["loss"] for r in logged if "loss" in r],
        [r["grad_norm"] for r in logged if "loss" in r],
        [r["val_loss"] for r in logged if "val_loss" in r],
    )


def assert_equal_to(run_dir, reference):
    assert_close_rel(load_weights(run_dir), load_weights(reference), rtol=1e-5)
    for mine, theirs in zip(rows(run_dir), rows(reference), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5) and mine


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, workdir):
    """Each model's whole global batch in one process, made once (the cp runs compare with it)."""
    made: dict[str, object] = {}

    def reference(model):
        if model not in made:
            made[model] = run(tmp_path_factory.mktemp("cp") / model, model, cwd=workdir)
        return made[model]

    return reference


@needs_mesh
@pytest.mark.parametrize(
    "model,nproc,changes",
    [
        ("gpt", 4, ["dist.strategy=fsdp"]),  # cp 2 x fsdp 2
        ("gpt", 4, ["dist.strategy=fsdp", "dist.tensor_parallel=2"]),  # cp 2 x tp 2
        ("gpt-packed", 2, []),  # cp 2 (ddp), packed conversations with their document masks
        ("llama", 4, ["dist.strategy=fsdp"]),
        ("llama", 4, ["dist.strategy=fsdp", "dist.tensor_parallel=2"]),  # grouped-query heads split, then gathered
        ("llama-packed", 2, []),
        ("gpt", 4, ["dist.pipeline_parallel=2"]),  # pp 2 x cp 2: the stages hold the context group
        ("llama", 4, ["dist.pipeline_parallel=2"]),
    ],
    ids=["gpt-fsdp2", "gpt-tp2", "gpt-packed", "llama-fsdp2", "llama-tp2", "llama-packed", "gpt-pp2", "llama-pp2"],
)
def test_cp_2_equals_one_process(tmp_path, one_process, workdir, model, nproc, changes):
    reference = one_process(model)
    cp = run(tmp_path / "cp", model, "dist.context_parallel=2", *changes, nproc=nproc, cwd=workdir)
    assert_equal_to(cp, reference)


@needs_mesh
def test_cp_2_equals_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path, one_process, workdir):
    """cp 2 alone equals one process; checkpoints hold no context-parallel state: its step-2
    checkpoint (ddp: whole) resumes in one process and ends where the one process does."""
    cp = run(tmp_path / "cp", "gpt", "dist.context_parallel=2", nproc=2, cwd=workdir)
    assert_equal_to(cp, one_process("gpt"))  # cp 2 alone (ddp: DDP's group is the context group)
    shutil.rmtree(cp / "checkpoints" / "step_00000004")  # as if the run had stopped after step 2
    (cp / "model.pt").unlink()
    assert_equal_to(run(cp, "gpt", cwd=workdir), one_process("gpt"))


def test_each_rank_holds_a_head_and_a_tail_chunk():
    assert chunk_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([chunk_index(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))


@pytest.mark.parametrize("size", [2, 3])
def test_a_ranks_mask_is_the_whole_sequences_rows_and_columns_of_its_tokens(size):
    """The mask a rank builds from its own queries' position ids (packed documents, padding of
    position 0) is the one-process document-causal mask at its queries' rows, over the gathered
    keys' columns; without position ids, plain causality."""
    length = 12 * size
    documents = [[5, 9, 3, length - 17 - 3, 1, 1, 1], [length]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in doc]) for doc in documents])
    whole = document_causal_mask(positions)[:, 0]
    for rank in range(size):
        context = Context(size, rank, group=None)
        mine, keys = (
            context.local_index(length // size, torch.device("cpu")),
            context.key_index(length // size, torch.device("cpu")),
        )
        expected = whole[:, mine][:, :, keys]
        assert torch.equal(context.mask(positions[:, mine], length // size, torch.device("cpu"))[:, 0], expected)
        causal = context.mask(None, length // size, torch.device("cpu"))[0, 0]
        assert torch.equal(causal, torch.ones(length, length, dtype=torch.bool).tril()[mine][:, keys])


def test_a_batch_is_split_after_its_labels_are_shifted_and_padded_to_the_chunks():
    labels = torch.arange(10).reshape(1, 10) + 100
    batch = {"input_ids": torch.arange(10).reshape(1, 10), "labels": labels, "attention_mask": torch.ones(1, 10)}
    parts = [split(batch, 2, rank, shift=True) for rank in range(2)]
    # padded to 12 (a multiple of 2 x 2): rank 0 holds tokens 0-2 and 9-11, rank 1 tokens 3-8
    assert parts[0]["input_ids"].tolist() == [[0, 1, 2, 9, 0, 0]]
    assert parts[0]["shift_labels"].tolist() == [[101, 102, 103, -100, -100, -100]]
    assert parts[1]["shift_labels"].tolist() == [[104, 105, 106, 107, 108, 109]]
    assert parts[0]["position_ids"].tolist() == [[0, 1, 2, 9, 0, 0]]
    assert parts[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]]
    with pytest.raises(RecipeError, match="divisible by 4") as e:
        split((torch.zeros(2, 10, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)), 2, 0, shift=False)
    assert e.value.key == "dist.context_parallel"
    moved = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 5, 6, 7, 0, 1]])}
    with pytest.raises(RecipeError, match="starting at position id 5"):
        split(moved, 2, 0, shift=False)


CHECKS = [
    (["train.loss_mean_over=samples"], "train.loss_mean_over"),
    (["train.loss_mean_over=auto"], "train.loss_mean_over"),  # with a loss component: samples
    (["data.train.seq_len=18", "data.val.seq_len=18", "model.seq_len=18"], "dist.context_parallel: 2 splits"),
    (["train.compile=true"], "train.compile"),
]


@needs_mesh
@pytest.mark.parametrize("changes,key", CHECKS, ids=["samples", "auto", "length", "compile"])
def test_what_cp_cannot_serve_is_one_line_at_check(changes, key):
    recipe, tiny = MODELS["gpt"]
    proc = launcher(
        "check", "--nproc", "2", ROOT / "recipes" / recipe, *SHARED, *tiny, "dist.context_parallel=2", *changes
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr


@needs_mesh
def test_check_prints_the_context_dimension_and_what_each_rank_holds():
    recipe, tiny = MODELS["gpt"]
    proc = launcher("check", "--nproc", "4", ROOT / "recipes" / recipe, *SHARED, *tiny, "dist.context_parallel=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 ranks = 2 replicate x 1 shard x 2 context x 1 tensor" in proc.stdout
    assert "2 ranks per sequence of 16 tokens: 8 per rank" in proc.stdout
    assert "activations per rank" in proc.stdout and "without context parallelism" in proc.stdout
    # fsdp would shard the state over the data-parallel x context ranks (its mesh folds them together)
    assert "per rank, fsdp over 4 " in proc.stdout


@needs_mesh
def test_a_model_without_replaceable_attention_is_refused_at_check():
    proc = launcher(
        "check",
        "--nproc",
        "2",
        ROOT / "recipes" / "quickstart.yaml",
        "dist.context_parallel=2",
        "train.loss_mean_over=tokens",
    )
    assert proc.returncode == 2, proc.stderr
    assert "dist.context_parallel" in proc.stderr and "set dist.context_parallel=1" in proc.stderr


@pytest.mark.skipif(torch_version() >= MIN_TORCH, reason="torch >= 2.6 runs context parallelism")
def test_on_an_older_torch_cp_is_one_line_at_check():
    recipe, tiny = MODELS["gpt"]
    proc = launcher("check", "--nproc", "2", ROOT / "recipes" / recipe, *SHARED, *tiny, "dist.context_parallel=2")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "dist.context_parallel" in proc.stderr and "torch 2.6" in proc.stderr


def test_the_gpt_takes_labels_already_shifted():
    """A rank's part of a sequence cannot shift its labels (the next token may be another rank's):
    the split gives the GPT `shift_labels`, as it does a micro-batch that counts no token, which the
    GPT's own loss takes as they are (it had no such argument: a TypeError)."""
    from launcher.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=16, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    ids = torch.randint(0, 16, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
        assert float(model(input_ids=ids, labels=labels, shift_labels=shifted).loss) == pytest.approx(
            float(loss), rel=1e-6
        )
