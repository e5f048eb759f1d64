"""Measure how far `transformers.Trainer`'s gradient-accumulated update is from the exact token-mean update.

Setup (CPU, float32, seconds): a tiny GPT-2 (vocab 64, 2 layers, width 32, no dropout) and 16 "documents" of very
different lengths (3 to 60 tokens), right-padded to the longest document of each micro-batch, with labels -100 on the
padding.

* Exact update: one SGD step (lr 1, no momentum, no weight decay, no clipping) on the model's own loss over all 16
  documents in one batch, i.e. the mean cross-entropy over every valid next-token label.
* Trainer: the same initial weights, data, order (`train_sampling_strategy="sequential"`) and optimizer, with
  `per_device_train_batch_size=2` and `gradient_accumulation_steps=8`, so its single optimizer step covers the same
  16 documents. Several configurations a user can hit are run (see the table). Trainer's update is the -lr * grad
  its SGD step applies (recorded by a step pre-hook and checked against params_after - params_before, which itself
  is too coarse in float32 for the LayerNorm weights near 1).
* Token-weighted accumulation (the launcher's rule): each micro-batch's mean loss weighted by its share of the step's
  valid shifted labels, computed by hand here.

For each configuration it prints ||update|| / ||exact||, the projection <update, exact> / ||exact||^2, the cosine,
and the largest per-tensor relative error ||update_t - exact_t|| / ||exact_t||, plus the versions and the date.

Run: `python bench/trainer_exactness.py` (about 10-20 s on 2 CPU cores; downloads nothing).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

VOCAB = 64
LR = 1.0
MICRO_BATCH = 2
ACCUM = 8
# 16 documents; neighbours (one micro-batch) have very different lengths.
LENGTHS = [60, 3, 45, 7, 31, 4, 58, 12, 3, 52, 20, 9, 38, 5, 27, 60]

Batch = dict[str, torch.Tensor]
Delta = dict[str, torch.Tensor]


def make_model() -> GPT2LMHeadModel:
    """Tiny GPT-2 with fixed initial weights and no dropout."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def make_documents() -> list[dict[str, list[int]]]:
    """16 documents of random token ids in [3, VOCAB) with the lengths in LENGTHS."""
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist()} for n in LENGTHS]


def collate(features: list[dict[str, list[int]]]) -> Batch:
    """Right-pad to the longest document: input_ids 0, attention_mask 0, labels -100 on padding."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for row, f in enumerate(features):
        ids = torch.tensor(f["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def snapshot(model: nn.Module) -> Delta:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def difference(after: Delta, before: Delta) -> Delta:
    return {name: after[name] - before[name] for name in before}


def sgd_delta(model: nn.Module) -> Delta:
    """The update one plain SGD step would make from the accumulated .grad."""
    return {name: -LR * p.grad.detach().clone() for name, p in model.named_parameters()}


def exact_update(docs: list[dict[str, list[int]]]) -> Delta:
    """One step on the model's token-mean loss over all documents in a single batch."""
    model = make_model()
    model.train()
    model(**collate(docs)).loss.backward()
    return sgd_delta(model)


def token_weighted_update(docs: list[dict[str, list[int]]]) -> Delta:
    """Launcher's rule: micro-batch mean loss x (its valid shifted labels / all valid shifted labels of the step)."""
    model = make_model()
    model.train()
    micro = [collate(docs[i : i + MICRO_BATCH]) for i in range(0, len(docs), MICRO_BATCH)]
    total = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro)
    for b in micro:
        weight = int(b["labels"][:, 1:].ne(-100).sum()) / total
        (model(**b).loss * weight).backward()
    return sgd_delta(model)


class WrapperNoKwargs(nn.Module):
    """A thin wrapper whose forward has no **kwargs, so Trainer cannot pass num_items_in_batch."""

    def __init__(self, lm: GPT2LMHeadModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class WrapperKwargs(nn.Module):
    """A thin wrapper that forwards **kwargs (so num_items_in_batch reaches GPT-2's loss)."""

    def __init__(self, lm: GPT2LMHeadModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def causal_lm_loss_sum(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """A user `compute_loss_func`: shifted next-token cross-entropy, summed and divided by num_items_in_batch."""
    logits = outputs["logits"][:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        return loss / target.ne(-100).sum()
    return loss / num_items_in_batch


def trainer_update(
    docs: list[dict[str, list[int]]],
    wrap: Callable[[GPT2LMHeadModel], nn.Module] | None = None,
    compute_loss_func: Callable[..., torch.Tensor] | None = None,
    **overrides: Any,
) -> Delta:
    """One Trainer optimizer step (8 micro-batches of 2, in order) from the same initial weights."""
    lm = make_model()
    model = wrap(lm) if wrap is not None else lm
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    # Record the update SGD is about to apply (-lr * grad): params_after - params_before loses float32 precision on
    # parameters near 1 (LayerNorm weights), so it is only used as a cross-check.
    applied: list[Delta] = []
    optimizer.register_step_pre_hook(lambda *_: applied.append(sgd_delta(model)))
    before = snapshot(model)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=ACCUM,
            max_steps=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            **overrides,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=docs,
            data_collator=collate,
            optimizers=(optimizer, None),
            compute_loss_func=compute_loss_func,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    assert len(applied) == 1, f"expected one optimizer step, got {len(applied)}"
    moved = difference(snapshot(model), before)
    for name, d in applied[0].items():
        torch.testing.assert_close(moved[name], d, rtol=0.0, atol=1e-6)
    return {name.removeprefix("lm."): d for name, d in applied[0].items()}


def compare(delta: Delta, exact: Delta) -> tuple[float, float, float, float]:
    """(norm ratio, projection ratio, cosine, max per-tensor relative error) of delta against exact."""
    names = list(exact)
    d = torch.cat([delta[n].double().flatten() for n in names])
    e = torch.cat([exact[n].double().flatten() for n in names])
    norm_ratio = (d.norm() / e.norm()).item()
    projection = (d @ e / (e @ e)).item()
    cosine = (d @ e / (d.norm() * e.norm())).item()
    max_rel = max(((delta[n] - exact[n]).double().norm() / exact[n].double().norm()).item() for n in names)
    return norm_ratio, projection, cosine, max_rel


def set_loss_type(lm: GPT2LMHeadModel) -> GPT2LMHeadModel:
    lm.loss_type = "ForCausalLM"
    return lm


def main() -> None:
    start = time.perf_counter()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    docs = make_documents()
    exact = exact_update(docs)

    shifted = sum(n - 1 for n in LENGTHS)
    unshifted = sum(LENGTHS)
    print(f"{len(docs)} documents, lengths {LENGTHS}")
    print(f"valid next-token labels: {shifted}; non-(-100) label entries before the shift: {unshifted}")
    print(f"{shifted}/{unshifted} = {shifted / unshifted:.4f}; micro-batch {MICRO_BATCH} x accumulation {ACCUM}\n")

    rows: list[tuple[str, Delta]] = [
        ("token-weighted accumulation (the launcher's rule)", token_weighted_update(docs)),
        ("Trainer defaults, GPT2LMHeadModel", trainer_update(docs)),
        ("Trainer, average_tokens_across_devices=False", trainer_update(docs, average_tokens_across_devices=False)),
        ('Trainer, GPT2LMHeadModel with loss_type="ForCausalLM" set', trainer_update(docs, wrap=set_loss_type)),
        (
            "Trainer, compute_loss_func (shifted CE sum / num_items_in_batch)",
            trainer_update(docs, compute_loss_func=causal_lm_loss_sum),
        ),
        ("Trainer, wrapper forward(**kwargs) passing num_items_in_batch", trainer_update(docs, wrap=WrapperKwargs)),
        (
            "Trainer, wrapper forward without **kwargs (no num_items_in_batch)",
            trainer_update(docs, wrap=WrapperNoKwargs),
        ),
    ]

    print("| configuration | ‖update‖ / ‖exact‖ | ⟨update, exact⟩ / ‖exact‖² | cosine | max rel. error per tensor |")
    print("|---|---|---|---|---|")
    for label, delta in rows:
        norm_ratio, projection, cosine, max_rel = compare(delta, exact)
        print(f"| {label} | {norm_ratio:.4f} | {projection:.4f} | {cosine:.6f} | {max_rel:.2e} |")

    print(
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    )
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
