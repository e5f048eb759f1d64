"""A GPT as an nn.Sequential: [embedding, block x n_layers, final norm, head].

Attention is torch's fused scaled_dot_product_attention (causal). Being a Sequential, the model
works with checkpoint_sequential as it is: given a tensor of token ids, it runs as one.

Given a mapping batch (`model(input_ids=..., labels=..., position_ids=...)`: TokenizedText or
ChatData through launcher.collate.PadToLongest), it computes its own next-token loss, as transformers'
causal LMs do, and with `position_ids` (packed documents, launcher/datasets/packing.py) each token
attends only to the tokens of its own document: a document starts where the position ids do not
go up by one, as transformers reads them. The document-causal mask is a boolean one for SDPA.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from launcher.errors import ArgumentError, RecipeError
from launcher.parallel import sizes
from launcher.parallel.context import Context

IGNORE_INDEX = -100  # labels no loss counts (padding, prompts, each document's first token)


class Embedding(nn.Module):
    cp_context: Context | None = None  # dist.context_parallel: this rank holds some of each sequence's tokens

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            pos = positions
        elif self.cp_context is not None:  # a chunk of the sequence: the tokens' global positions
            pos = self.cp_context.local_index(idx.size(1), idx.device)
        else:
            pos = torch.arange(idx.size(1), device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class Block(nn.Module):
    cp_context: Context | None = None  # dist.context_parallel: attention gathers the group's keys and values

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        # query, key and value apart: tensor parallelism splits each by heads (a fused qkv's rows,
        # split evenly, would give a rank queries of some heads and keys of others)
        self.q = nn.Linear(d_model, d_model)
        # no key bias: it shifts all of a query's logits alike, which softmax ignores, so its gradient is
        # exactly 0 and it would learn only float noise (which differs between layouts)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: [B, 1, T, T], True where a query may attend (document-causal); None: causal. Under
        context parallelism: [B, 1, T, T x cp], over the group's keys (launcher/parallel/context.py)."""
        B, T, _ = x.shape
        h = self.ln1(x)
        # -1 heads: all of them, or under tensor parallelism this rank's share
        q, k, v = (m(h).view(B, T, -1, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        p = self.dropout if self.training else 0.0
        if self.cp_context is not None:
            a = self.cp_context.attend(q, k, v, mask, dropout_p=p)
        elif mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, -1)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalLMOutput(NamedTuple):
    """What the GPT gives a mapping batch with labels (the loop reads `.loss`, evaluation `.logits`)."""

    loss: torch.Tensor
    logits: torch.Tensor


class GPTModel(nn.Sequential):
    """The Sequential, with the figures the metrics read (tokens/s, MFU)."""

    shifts_labels = True  # its own loss predicts labels[..., 1:] (launcher/data/batches.py counts those)

    flops_per_sample: float  # forward + backward
    tokens_per_sample: int
    vocab_size: int  # token ids it embeds (launcher/data/fit.py checks the data against these two)
    max_positions: int  # the longest sequence its position embedding covers
    # dist.tensor_parallel (launcher/parallel/tensor.py): attention and MLP column-wise, then row-wise
    tp_plan = {"*.q": "colwise", "*.k": "colwise", "*.v": "colwise", "*.proj": "rowwise"}
    tp_plan |= {"*.mlp.0": "colwise", "*.mlp.2": "rowwise"}
    # dist.pipeline_parallel (launcher/parallel/pipeline_split.py): the children before the blocks
    # (the embedding, on stage 0) and after them (the norm and head, on the last stage)
    pipeline_ends = (1, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor | CausalLMOutput:
        """Token ids -> logits, as the Sequential; with `labels`, the mean next-token loss too.
        `attention_mask` marks padding, which PadToLongest puts at the right: under causal attention no
        real token attends to it, and its labels are -100, so it changes nothing here.
        `shift_labels` (transformers' name): the labels already aligned with the logits, which the
        loss then takes as they are (a micro-batch that counts no token; a rank's part of a
        sequence under context parallelism, which cannot shift across the parts it lacks)."""
        if position_ids is None and labels is None and attention_mask is None:
            return super().forward(input_ids)  # the Sequential, as checkpoint_sequential runs it
        if labels is None:
            raise RecipeError(
                "loss",
                "the built-in GPT given a mapping batch computes its own next-token loss from its labels: "
                "remove the recipe's loss component",
            )
        blocks = [m for m in self if isinstance(m, Block)]
        context = blocks[0].cp_context if blocks else None
        mask: torch.Tensor | None
        if context is not None:
            mask = context.mask(position_ids, input_ids.size(1), input_ids.device)
        else:
            mask = None if position_ids is None else document_causal_mask(position_ids)
        x = self[0](input_ids, position_ids)
        for block in blocks:
            x = block(x, mask)
        logits = self[-1](self[-2](x))
        scored, targets = logits, shift_labels
        if targets is None:  # position t predicts labels[t + 1]
            scored, targets = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(
            scored.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return CausalLMOutput(loss, logits)

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
    _check_sizes(vocab_size, seq_len, d_model, n_layers)
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


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T], True where query i may attend to key j: j <= i, in the same document. A
    document starts where the position ids do not go up by one (transformers'
    `find_packed_sequence_indices`), so padding of position 0 is one-token documents of its own."""
    first = position_ids[:, :1] - 1
    document = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    T = position_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


MAX_BLOCKS = 10_000


def _check_sizes(vocab_size: int, seq_len: int, d_model: int, n_layers: int) -> None:
    """Sizes no machine holds, by their argument, before anything is allocated: a built-in GPT with
    a few zeros too many builds on the meta device at `launcher check` and would fail only in the run,
    at the allocator (or, with millions of blocks, build for hours)."""
    given = {"vocab_size": vocab_size, "seq_len": seq_len, "d_model": d_model, "n_layers": n_layers}
    if n_layers > MAX_BLOCKS:  # each takes milliseconds to build, even on the meta device
        raise ArgumentError(
            "n_layers",
            f"{n_layers:,} blocks would take hours to build, and the deepest transformers have a few hundred; "
            "a few zeros too many?",
        )
    # the largest weights, float32: the token embedding and the head, the positions, the MLP's
    for argument, rows in (("vocab_size", vocab_size), ("seq_len", seq_len), ("d_model", 4 * d_model)):
        size = 4 * rows * d_model
        if size > sizes.TENSOR_BYTES:
            name = argument if given[argument] >= d_model else "d_model"
            raise ArgumentError(
                name,
                f"{given[name]:,} makes a {rows:,} x {d_model:,} weight of {sizes.describe(size)}, more than "
                "any device or host holds (the run would fail allocating it); a few zeros too many?",
            )
    terms = {"n_layers": n_layers * 12 * d_model * d_model, "vocab_size": 2 * vocab_size * d_model}
    total = 4 * (sum(terms.values()) + seq_len * d_model)
    if total > sizes.MODEL_BYTES:
        name = max(terms, key=terms.__getitem__)
        raise ArgumentError(
            name,
            f"{given[name]:,} makes {sizes.describe(total)} of weights, far beyond any cluster's memory; "
            "a few zeros too many?",
        )
