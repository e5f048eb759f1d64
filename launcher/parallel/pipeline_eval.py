"""Evaluation under pipeline parallelism: each micro-batch through the stages in order, forward only.

torch's `schedule.eval` runs a schedule without its backward, but not every schedule: on torch 2.14.1
(CPU, gloo) ZBV's and DualPipeV's fail ("can't steal_bwd_input if this stage doesn't have backward"),
while gpipe, 1f1b, interleaved_1f1b and interleaved_zb run. Evaluation needs no overlap to be right,
so it runs here the plainest way, the same for every schedule and torch: for each micro-batch, stage
after stage, the rank holding a stage receives the hidden states from the rank holding the one before
(their shape and dtype first, since batches of evaluation vary), runs its stage and sends them on.
Every rank walks the same (micro-batch, stage) order, so each send meets its receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]
_META = 7  # dtype, number of dimensions, up to 5 sizes


def stage_ranks(pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline rank that holds each stage."""
    from launcher.parallel.pipeline import stage_ids

    owner: dict[int, int] = {}
    for rank in range(pp_size):
        for s in stage_ids(rank, pp_size, stages_per_rank, schedule):
            owner[s] = rank
    return [owner[s] for s in range(len(owner))]


@torch.no_grad()
def forward_only(
    modules: Sequence[nn.Module], ids: Sequence[int], ranks: Sequence[int], group: Any, inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The last stage's outputs (logits) for each of `inputs` (the micro-batches, read only where this
    rank holds stage 0) on the rank holding the last stage; an empty list elsewhere. `modules` are this
    rank's stages, `ids` their indices, `ranks[s]` the pipeline rank holding stage s."""
    import torch.distributed as dist

    me = dist.get_rank(group)
    mine = dict(zip(ids, modules, strict=True))
    last = len(ranks) - 1
    outputs: list[torch.Tensor] = []
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    for x in inputs:
        hidden: torch.Tensor | None = x.to(device) if 0 in mine else None
        for s in range(len(ranks)):
            if ranks[s] != me:
                continue
            if s > 0 and ranks[s - 1] != me:
                hidden = _recv(dist.get_global_rank(group, ranks[s - 1]), group, device)
            hidden = mine[s](hidden)
            if s == last:
                outputs.append(hidden)
            elif ranks[s + 1] != me:
                _send(hidden, dist.get_global_rank(group, ranks[s + 1]), group)
    return outputs


def _send(t: torch.Tensor, dst: int, group: Any) -> None:
    import torch.distributed as dist

    t = t.contiguous()
    meta = torch.zeros(_META, dtype=torch.int64, device=t.device)
    meta[0], meta[1] = DTYPES.index(t.dtype), t.dim()
    meta[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(meta, dst, group=group)
    dist.send(t, dst, group=group)


def _recv(src: int, group: Any, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    meta = torch.zeros(_META, dtype=torch.int64, device=device)
    dist.recv(meta, src, group=group)
    dtype, ndim, *shape = meta.tolist()
    t = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=device)
    dist.recv(t, src, group=group)
    return t


class Outputs(nn.Module):
    """What evaluation calls under pipeline parallelism: the last stage's logits for a batch, on every
    rank of the pipeline (sent from the rank holding the last stage), so that each computes the same
    sums and the strategy's sum over the data counts them once. A mapping batch with labels (a
    transformers model's own loss) gets the model's loss back too."""

    def __init__(self, stages: Sequence[nn.Module], ids: Sequence[int], ranks: Sequence[int], group: Any) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)  # .eval() and .train() reach them
        self.ids, self.ranks, self.group = list(ids), list(ranks), group

    def forward(self, x: torch.Tensor | None = None, **features: Any) -> Any:
        import torch.distributed as dist

        inputs = x if x is not None else features["input_ids"]
        outputs = forward_only(list(self.stages), self.ids, self.ranks, self.group, [inputs])
        last = dist.get_global_rank(self.group, self.ranks[-1])
        device = inputs.device
        if outputs:
            logits = outputs[0]
            for rank in range(dist.get_world_size(self.group)):
                if rank != self.ranks[-1]:
                    _send(logits, dist.get_global_rank(self.group, rank), self.group)
        else:
            logits = _recv(last, self.group, device)
        from launcher.parallel.pipeline_batches import aligned_lm_loss, causal_lm_loss

        if features.get("shift_labels") is not None:  # already aligned (a micro-batch's part under cp)
            return {"loss": aligned_lm_loss(logits, features["shift_labels"]), "logits": logits}
        labels = features.get("labels")
        if labels is None:
            return logits
        return {"loss": causal_lm_loss(logits, labels), "logits": logits}
