"""A GPT as an nn.Sequential: [embedding, block x n_layers, final norm, head].

Attention is torch's fused scaled_dot_product_attention (causal). Being a Sequential, the model
works with checkpoint_sequential as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPTModel(nn.Sequential):
    """The Sequential, with the figures the metrics read (tokens/s, MFU)."""

    flops_per_sample: float  # forward + backward
    tokens_per_sample: int
    vocab_size: int  # token ids it embeds (launcher/data_fit.py checks the data against these two)
    max_positions: int  # the longest sequence its position embedding covers

    def init_weights(self) -> None:
        """GPT-2 init; residual projections scaled down by depth. Also what dist.fsdp.meta_init
        calls on each rank's shards."""
        n_layers = sum(isinstance(m, Block) for m in self)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("weight"):  # LayerNorm's: fresh modules start at one; materialised ones must too
                nn.init.ones_(p)


def GPT(
    vocab_size: int = 256,
    seq_len: int = 256,
    d_model: int = 384,
    n_layers: int = 6,
    n_heads: int = 6,
    dropout: float = 0.0,
) -> GPTModel:
    model = GPTModel(
        Embedding(vocab_size, seq_len, d_model, dropout),
        *[Block(d_model, n_heads, dropout) for _ in range(n_layers)],
        nn.LayerNorm(d_model),
        nn.Linear(d_model, vocab_size, bias=False),
    )
    model.init_weights()
    # forward + backward FLOPs per token (6 per parameter-token + attention), for MFU
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("0.pos."))
    model.flops_per_sample = (6 * n_params + 12 * n_layers * d_model * seq_len) * seq_len
    model.tokens_per_sample = seq_len
    model.vocab_size, model.max_positions = vocab_size, seq_len
    return model
