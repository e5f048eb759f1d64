"""What `launcher check` prints for transformers models and tensor-parallel layouts (issue #34, item 6)."""

from __future__ import annotations

import types

import torch

from conftest import ROOT, TINY_GPT_SHAPE, launcher


def test_a_transformers_decoders_flops_equal_the_built_in_gpts_own_count_at_the_same_shape():
    """The estimate for a transformers model (from its config and parameters) against the built-in
    GPT's own count, at one shape: 2 layers, width 32, 64 tokens: the same attention term, and 6
    FLOPs per parameter per token (the GPT counts its parameters less its position embedding). With
    the base frozen (LoRA's) the weights' gradients are the adapters' only: 2 per parameter less."""
    import transformers

    from launcher.models import GPT
    from launcher.models.flops import flops_per_sample

    tokens = types.SimpleNamespace(tokens_per_sample=64)
    gpt = GPT(vocab_size=128, seq_len=64, d_model=32, n_layers=2, n_heads=2)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    estimate = flops_per_sample(hf, tokens)
    own = flops_per_sample(gpt, tokens)
    assert own == gpt.flops_per_sample
    gpt_counted = sum(p.numel() for p in gpt.parameters()) - 64 * 32  # less its position embedding
    hf_params = sum(p.numel() for p in hf.parameters())
    assert estimate - 6 * hf_params * 64 == own - 6 * gpt_counted * 64 == 12 * 2 * 32 * 64 * 64
    for p in hf.parameters():
        p.requires_grad_(False)
    frozen = flops_per_sample(hf, tokens)
    assert frozen == estimate - 2 * sum(p.numel() for p in hf.parameters()) * 64
    assert flops_per_sample(hf, types.SimpleNamespace()) is None  # no sequence length known: no estimate
    assert flops_per_sample(torch.nn.Linear(2, 2), tokens) is None


def test_check_prints_a_step_time_for_a_transformers_model(tmp_path):
    from hfkit import example_base

    example_base(tmp_path)  # the base sft_lora.yaml fine-tunes (recipes/hf_causal_lm.yaml's export)
    proc = launcher("check", ROOT / "recipes" / "sft_lora.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("step time (estimate)") for line in proc.stdout.splitlines()), proc.stdout


def test_check_says_which_layers_the_tensor_parallel_plan_splits_without_a_wide_first_column():
    gpt = [ROOT / "recipes" / "gpt.yaml", *TINY_GPT_SHAPE]
    proc = launcher("check", *gpt, "--nproc", "4", "dist.tensor_parallel=2", "dist.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr
    rows = {line[:24].strip(): line[24:].strip() for line in proc.stdout.split("# plan")[1].splitlines() if line}
    assert rows["tensor parallel"].startswith("*.q colwise: 2 Linears, *.k colwise: 2 Linears, *.v colwise: 2 Linears")
    assert "*.mlp.2 rowwise: 2 Linears split over 2 ranks" in rows["tensor parallel"]
    assert "per rank, fsdp 2 x tp 2" in rows and "per rank, fsdp over 2" in rows
    one = launcher("check", *gpt)
    assert "per rank, ddp" in one.stdout and "fsdp over 1" not in one.stdout  # the same as ddp's: no row
