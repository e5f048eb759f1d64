"""Pipeline parallelism's core (launcher/parallel/pipeline*.py): the split of blocks into stages, the
stage modules of the built-in GPT and of transformers causal LMs (run one after another they are the
whole model, under the whole model's parameter names), the one-line errors, and on 2 real gloo ranks
one optimizer step under each schedule equal to one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SUPPORT, worker_env
from launcher.errors import RecipeError
from launcher.models.gpt import GPT
from launcher.parallel import pipeline, pipeline_batches, pipeline_eval, pipeline_split


def one_line(error: pytest.ExceptionInfo, key: str) -> str:
    assert error.value.key == key
    assert "\n" not in str(error.value)
    return error.value.message


def test_blocks_are_split_evenly_with_leftovers_to_the_middle_stages_first():
    assert pipeline.stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert pipeline.stage_layers(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # blocks left over go to the middle stage, then stage 0, then the last (which holds the head)
    assert pipeline.stage_layers(7, 3) == [range(0, 2), range(2, 5), range(5, 7)]
    assert pipeline.stage_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert pipeline.stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert pipeline.stage_layers(3, 1) == [range(0, 3)]


def test_a_split_names_where_stages_start():
    assert pipeline.stage_layers(8, 2, split=[3]) == [range(0, 3), range(3, 8)]
    # stage 0 with only the embeddings, the last stage with only the norm and head
    assert pipeline.stage_layers(4, 3, split=[0, 4]) == [range(0, 0), range(0, 4), range(4, 4)]


@pytest.mark.parametrize(
    ("args", "key", "words"),
    [
        ((3, 4, 1, None), pipeline.PP_KEY, "4 stages (4 ranks x 1 per rank) for a model of 3 blocks"),
        ((4, 2, 4, None), pipeline.STAGES_KEY, "8 stages (2 ranks x 4 per rank)"),
        ((8, 2, 1, [3, 5]), pipeline.SPLIT_KEY, "gives 3 stages, but there are 2"),
        ((8, 3, 1, [5, 3]), pipeline.SPLIT_KEY, "strictly increasing block numbers within 0..8"),
        ((8, 3, 1, [2, 2]), pipeline.SPLIT_KEY, "strictly increasing"),
        ((8, 2, 1, [9]), pipeline.SPLIT_KEY, "within 0..8"),
        ((8, 2, 1, "3"), pipeline.SPLIT_KEY, "not a list of block numbers"),
        ((8, 0, 1, None), pipeline.PP_KEY, "not a count of ranks"),
    ],
)
def test_a_split_that_cannot_be_is_one_line_naming_its_key(args, key, words):
    with pytest.raises(RecipeError) as error:
        pipeline.stage_layers(*args)
    assert words in one_line(error, key)


def test_stages_are_placed_in_a_loop_or_a_v():
    assert pipeline.stage_ids(0, 2, 2, "interleaved_1f1b") == [0, 2]
    assert pipeline.stage_ids(1, 4, 1, "1f1b") == [1]
    assert pipeline.stage_ids(0, 2, 2, "zbv") == [0, 3]  # the first and the last stage on rank 0
    assert pipeline.stage_ids(1, 2, 2, "dualpipev") == [1, 2]
    assert pipeline_eval.stage_ranks(2, 2, "zbv") == [0, 1, 1, 0]
    assert pipeline_eval.stage_ranks(2, 2, "interleaved_1f1b") == [0, 1, 0, 1]


def test_a_torch_that_cannot_run_the_schedule_is_one_line():
    with pytest.raises(RecipeError) as error:
        pipeline.check_torch("1f1b", "2.4.1")
    assert "needs torch >= 2.8" in one_line(error, pipeline.PP_KEY)
    with pytest.raises(RecipeError) as error:
        pipeline.check_torch("zbv", "2.10.0+cu126")
    assert "zbv needs torch >= 2.13" in one_line(error, pipeline.SCHEDULE_KEY)
    pipeline.check_torch("interleaved_1f1b", "2.8.0")
    pipeline.check_torch("dualpipev", "2.13.0")
    with pytest.raises(RecipeError) as error:
        pipeline.check_torch("pipedream", "2.14.0")
    assert "choose one of gpipe, 1f1b" in one_line(error, pipeline.SCHEDULE_KEY)


def test_the_installed_torch_runs_the_1f1b_family_or_says_which_it_needs():
    # CI runs this on torch 2.4.1 too (.ci/suites oldest): there, one line naming the key
    if pipeline.torch_version() >= pipeline.PIPELINE_TORCH:
        pipeline.check_torch("interleaved_1f1b")
    else:
        with pytest.raises(RecipeError) as error:
            pipeline.check_torch("1f1b")
        assert f"needs torch >= 2.8 (torch {torch.__version__}'s" in one_line(error, pipeline.PP_KEY)


def test_schedules_check_their_stages_per_rank_and_micro_batches():
    with pytest.raises(RecipeError) as error:
        pipeline.check_stages_per_rank("1f1b", 2)
    assert "choose interleaved_1f1b" in one_line(error, pipeline.STAGES_KEY)
    with pytest.raises(RecipeError) as error:
        pipeline.check_stages_per_rank("zbv", 3)
    assert "exactly 2" in one_line(error, pipeline.STAGES_KEY)
    with pytest.raises(RecipeError) as error:
        pipeline.check_micro_batches("interleaved_1f1b", 2, 2, 3)
    assert "at least one micro-batch per stage (4: 2 ranks x 2)" in one_line(error, pipeline.MICRO_KEY)
    with pytest.raises(RecipeError) as error:
        pipeline.check_micro_batches("interleaved_1f1b", 2, 2, 5)
    assert "multiple of 2" in one_line(error, pipeline.MICRO_KEY)
    with pytest.raises(RecipeError):
        pipeline.check_micro_batches("1f1b", 4, 1, 3)
    pipeline.check_micro_batches("gpipe", 4, 1, 1)
    pipeline.check_micro_batches("interleaved_1f1b", 2, 2, 4)


def test_bubble_fractions():
    assert pipeline.bubble_fraction("gpipe", 4, 1, 8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction("1f1b", 4, 1, 8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction("interleaved_1f1b", 4, 2, 8) == pytest.approx(3 / 19)
    assert pipeline.bubble_fraction("zbv", 4, 2, 8) == pytest.approx(3 / 51)
    assert pipeline.bubble_fraction("1f1b", 1, 1, 8) == 0.0


def run_stages(stages, x):
    for stage in stages:
        x = stage(x)
    return x


def assert_split_is_the_whole(model, n_blocks, pp_size, stages_per_rank, x, split=None):
    want = model(x)
    want = getattr(want, "logits", want)
    layers = pipeline.stage_layers(n_blocks, pp_size, stages_per_rank, split)
    stages = pipeline_split.split_model(model, layers, list(range(len(layers))))
    assert torch.equal(run_stages(stages, x), want)
    names = [k for s in stages for k in s.state_dict()]
    assert len(names) == len(set(names))  # nothing is held twice
    assert set(names) == set(model.state_dict())  # the whole model's names (FQNs)
    for s in stages:
        for k, v in s.state_dict().items():
            assert v is model.state_dict()[k] or torch.equal(v, model.state_dict()[k])
    return stages


def test_the_gpt_split_is_the_whole_model_under_its_names():
    torch.manual_seed(0)
    model = GPT(vocab_size=32, seq_len=8, d_model=16, n_layers=5, n_heads=2).eval()
    x = torch.randint(32, (2, 8))
    stages = assert_split_is_the_whole(model, 5, 2, 2, x)
    assert [list(dict(s.named_children())) for s in stages] == [["0", "1"], ["2", "3"], ["4"], ["5", "6", "7"]]
    assert pipeline_split.n_blocks(model) == 5
    assert_split_is_the_whole(model, 5, 2, 1, x, split=[0])  # stage 0: only the embeddings


def tiny_hf(model_type: str, attn: str = "sdpa", **extra):
    import transformers

    small = {"vocab_size": 64, "num_hidden_layers": 4, "max_position_embeddings": 32}
    small |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    if model_type == "llama":
        config = transformers.LlamaConfig(**small, **extra)
    elif model_type == "qwen2":  # its upper layers with sliding-window attention, which has masks of its own
        config = transformers.Qwen2Config(
            **small, use_sliding_window=True, sliding_window=3, max_window_layers=2, **extra
        )
    else:
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=2, **extra)
        config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize(
    ("model_type", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "eager"), ("gpt2", "sdpa")]
)
def test_a_transformers_causal_lm_split_is_the_whole_model_under_its_names(model_type, attn):
    model = tiny_hf(model_type, attn, tie_word_embeddings=False)
    x = torch.randint(64, (2, 9))
    stages = assert_split_is_the_whole(model, 4, 2, 2, x)
    prefix = "transformer.h" if model_type == "gpt2" else "model.layers"
    assert any(k.startswith(f"{prefix}.3.") for k in stages[3].state_dict())
    assert "lm_head.weight" in stages[3].state_dict()
    assert_split_is_the_whole(model, 4, 3, 1, x, split=[1, 2])


def test_a_right_padded_batch_gives_the_whole_models_logits_and_loss():
    """Stages after the first see no attention mask: on right padding, the valid tokens' logits and
    the causal LM's own loss are the whole model's given the mask."""
    model = tiny_hf("llama", "eager")
    x = torch.randint(64, (2, 9))
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    labels = x.masked_fill(mask == 0, -100)
    out = model(input_ids=x, attention_mask=mask, labels=labels)
    stages = pipeline_split.split_model(model, pipeline.stage_layers(4, 2), [0, 1])
    logits = run_stages(stages, x)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], out.logits[valid], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pipeline_batches.causal_lm_loss(logits, labels), out.loss, rtol=1e-6, atol=0)


def test_a_model_that_cannot_be_split_is_one_line():
    with pytest.raises(RecipeError) as error:
        pipeline_split.split_model(tiny_hf("gpt2"), pipeline.stage_layers(4, 2), [0])
    assert "GPT2LMHeadModel ties its input embeddings to its head" in one_line(error, pipeline.PP_KEY)
    from launcher.models import MLP

    with pytest.raises(RecipeError) as error:
        pipeline_split.split_model(MLP([4, 8, 1]), pipeline.stage_layers(2, 2), [0])
    assert "cannot split Sequential into pipeline stages: it is neither the built-in GPT" in one_line(
        error, pipeline.PP_KEY
    )


def test_a_window_is_stacked_into_one_shape_with_fillers_of_weight_zero():
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}
    a["attention_mask"] = torch.tensor([[1, 1, 1], [1, 1, 0]])
    b = {k: v[:1, :2] for k, v in a.items()}
    batch, weights = pipeline_batches.stack_window([a, b], [0.7, 0.3], 3, 2, 5, pad_id=9)
    assert weights == [0.7, 0.3, 0.0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (6, 5) for k in a}
    assert batch["input_ids"][:4].eq(9).sum() == 2 * 2 + 3 + 5  # a's and b's padding
    assert batch["labels"][:4].ne(-100).sum() == 6 + 2  # padding adds no valid label
    assert batch["labels"][4:].eq(0).all()  # the filler's loss is finite (its weight is 0)
    inputs, target = pipeline_batches.schedule_inputs(batch, 3)
    assert inputs is batch["input_ids"] and target[:, -1].tolist() == [0, 0, 1, 1, 2, 2]
    left = dict(a, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(RecipeError) as error:
        pipeline_batches.stack_window([left], [1.0], 1, 2, 5)
    assert "padded on the left" in one_line(error, "data.collate")


@pytest.mark.skipif(pipeline.torch_version() < pipeline.PIPELINE_TORCH, reason="pipelining is exact from torch 2.8")
def test_one_step_under_each_schedule_on_two_ranks_equals_one_process():
    """gpipe, 1f1b and interleaved_1f1b (and from torch 2.13 the zero-bubble ones) in one launch:
    loss, gradients, gradient norm, weights after SGD and an evaluation's loss equal one process's,
    to 1e-5 relative (tests/support/pipeline_ranks.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(SUPPORT / "pipeline_ranks.py")]
    proc = subprocess.run(cmd, env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    done = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    expected = ["gpipe", "1f1b", "interleaved_1f1b"]
    if pipeline.torch_version() >= (2, 13):
        expected += ["interleaved_zb", "zbv", "dualpipev"]
    assert done == expected


def test_packed_samples_with_document_masks_are_refused_under_pipelining_in_one_line():
    """The stages take token ids alone: a packed batch's position ids (its document masks) would be
    dropped and attention would cross its documents, silently; refused instead, naming the key."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.tensor([[0, 1, 0, 1]])}
    with pytest.raises(RecipeError) as e:
        pipeline_batches.stack_window([batch], [1.0], 2, 1, 4)
    assert e.value.key == "dist.pipeline_parallel" and "pack_attention: cross" in e.value.message
