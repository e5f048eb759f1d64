"""Run on 2 ranks (torch.distributed.run, gloo): one optimizer step of the tiny GPT under each pipeline
schedule equals one process computing the token-mean loss of the same window: the loss, every
gradient, the gradient norm across stages and the weights after an SGD step, then the loss of an
evaluation through pipeline_eval.forward_only, to 1e-5 relative.

The window: 3 micro-batches of unequal valid tokens (one of a single sequence), padded by
pipeline_batches.stack_window to the schedule's 4 (the last a filler of weight 0). Prints one
"ok SCHEDULE" line per schedule."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from launcher.losses import TokenCrossEntropy
from launcher.models.gpt import GPT
from launcher.parallel import pipeline, pipeline_batches, pipeline_eval, pipeline_split

VOCAB, SEQ, N_BLOCKS, ROWS, N_MICRO, PP = 32, 12, 4, 2, 4, 2
RTOL = 1e-5


def window() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) micro-batches padded to their own longest row, as PadToLongest would."""
    g = torch.Generator().manual_seed(1)
    micro = []
    for lengths in ([9, 4], [12], [3, 7]):
        inputs = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        labels = torch.full_like(inputs, -100)
        for r, n in enumerate(lengths):
            inputs[r, :n] = torch.randint(VOCAB, (n,), generator=g)
            labels[r, :n] = torch.randint(VOCAB, (n,), generator=g)
        micro.append((inputs, labels))
    return micro


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
    assert err <= RTOL, f"{what}: relative difference {err:.3g}"


def reference(model: torch.nn.Module, micro: list, backward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One process: the mean of the token losses over the whole window, and its gradients' norm."""
    logits = [model(x) for x, _ in micro]
    flat = torch.cat([lg.reshape(-1, VOCAB) for lg in logits])
    loss = torch.nn.functional.cross_entropy(flat, torch.cat([y.reshape(-1) for _, y in micro]))
    if not backward:
        return loss, loss
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return loss.detach(), norm


def run(schedule: str, stages_per_rank: int, rank: int) -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, seq_len=SEQ, d_model=16, n_layers=N_BLOCKS, n_heads=2)
    whole = copy.deepcopy(model)
    micro = window()
    want_loss, want_norm = reference(whole, micro)
    torch.optim.SGD(whole.parameters(), lr=0.1).step()

    layers = pipeline.stage_layers(N_BLOCKS, PP, stages_per_rank)
    ids = pipeline.stage_ids(rank, PP, stages_per_rank, schedule)
    modules = pipeline_split.split_model(model, layers, ids)
    stages = pipeline.build_stages(modules, ids, len(layers), dist.group.WORLD, torch.device("cpu"))
    loss_fn = pipeline.WeightedLoss(TokenCrossEntropy())
    sched = pipeline.build_schedule(stages, schedule, N_MICRO, loss_fn)

    tokens = [int((y != -100).sum()) for _, y in micro]
    weights = [k / sum(tokens) for k in tokens]  # k_i W / K, W = 1 data-parallel rank
    batch, weights = pipeline_batches.stack_window(micro, weights, N_MICRO, ROWS, SEQ)
    inputs, target = pipeline_batches.schedule_inputs(batch, N_MICRO)
    has_first, has_last = 0 in ids, len(layers) - 1 in ids
    losses: list[torch.Tensor] = []
    loss_fn.begin(weights)
    sched.step(*([inputs] if has_first else []), target=target if has_last else None, losses=losses)

    params = [p for m in modules for p in m.parameters()]
    close(pipeline.grad_norm(params, dist.group.WORLD), want_norm, f"{schedule} gradient norm")
    if has_last:
        close(torch.stack(losses).sum(), want_loss, f"{schedule} loss")
    torch.optim.SGD(params, lr=0.1).step()
    reference_params = dict(whole.named_parameters())
    names = [n for m in modules for n, _ in m.named_parameters()]
    assert len(set(names)) == len(names)
    for m in modules:
        for name, p in m.named_parameters():  # the whole model's names
            close(p.grad, reference_params[name].grad, f"{schedule} gradient of {name}")
            close(p.detach(), reference_params[name].detach(), f"{schedule} weight {name} after the step")
    # evaluation: the micro-batches as they are (of different lengths) through the stepped stages
    ranks = pipeline_eval.stage_ranks(PP, stages_per_rank, schedule)
    outputs = pipeline_eval.forward_only(modules, ids, ranks, dist.group.WORLD, [x for x, _ in micro])
    assert all(p.grad is None or p.grad.grad_fn is None for p in params)
    if has_last:
        ce = TokenCrossEntropy()
        got = sum(ce(out, y) * k / sum(tokens) for out, (_, y), k in zip(outputs, micro, tokens, strict=True))
        after, _ = reference(whole, micro, backward=False)
        close(got, after, f"{schedule} evaluation loss")
    else:
        assert outputs == []
    owned = torch.tensor([len(names)])
    dist.all_reduce(owned)
    assert owned.item() == len(reference_params), "the stages hold every parameter once"


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    runs = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]
    if pipeline.torch_version() >= (2, 13):
        runs += [("interleaved_zb", 2), ("zbv", 2), ("dualpipev", 2)]
    for schedule, stages_per_rank in runs:
        run(schedule, stages_per_rank, rank)
        dist.barrier()
        if rank == 0:
            print(f"ok {schedule}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
