"""Components the tests name in recipes (importable by worker processes: tests/support is on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.datasets.token_file import TokenFile


def gpt_bytes(n_layers: int) -> list[str]:
    """Overrides of recipes/gpt.yaml: a GPT of `n_layers` blocks, 32 wide with 4 heads, on 16-byte
    sequences of a few kilobytes of text (the parallelism tests' model)."""
    return [
        "model.d_model=32",
        f"model.n_layers={n_layers}",
        "model.n_heads=4",
        "model.seq_len=16",
        "data.train.seq_len=16",
        "data.val.seq_len=16",
        "data.train.max_bytes=20000",
        "data.val.max_bytes=4000",
    ]


# 4 steps of 16 sequences in micro-batches of 4, fp32 SGD with momentum and clipping (float noise
# that Adam would amplify stays small), logged every step, checkpointed at steps 2 and 4
SGD_4_STEPS = [
    "data.batch_size=4",
    "data.num_workers=0",
    "train.precision=fp32",
    "train.global_batch_size=16",
    "train.max_steps=4",
    "train.warmup_steps=0",
    "train.eval_every_steps=4",
    "train.grad_clip_norm=1.0",
    "scheduler=null",
    "optimizer={_component_: torch.optim.SGD, lr: 0.1, momentum: 0.9}",
    "log.every_n_steps=1",
    "log.wandb=null",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=5",
]


def counting_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce as DDP would, and count the synchronising backward passes per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if bucket.is_last():
        out = Path(os.environ["COUNT_DIR"]) / f"rank{os.environ['RANK']}.txt"
        with open(out, "a") as f:
            f.write("1\n")
    return allreduce_hook(process_group, bucket)


class SlowToDescribe(ValueError):
    """An error whose first str() takes `delay_s`: it holds its rank between raising and recording
    the error, where a slow unwinding (freeing a big model, stopping DataLoader workers) would."""

    def __init__(self, message: str, delay_s: float):
        super().__init__(message)
        self.delay_s = delay_s

    def __str__(self) -> str:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
            self.delay_s = 0
        return super().__str__()


class FailOnRank(nn.Module):
    """A Linear that raises on `rank` at its `at_call`-th forward (training only). `describe_s`:
    the error takes that long to describe the first time (SlowToDescribe)."""

    def __init__(self, in_dim: int = 8, out_dim: int = 1, rank: int = 1, at_call: int = 3, describe_s: float = 0):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.rank, self.at_call, self.calls, self.describe_s = rank, at_call, 0, describe_s

    def forward(self, x):
        if self.training:
            self.calls += 1
            if int(os.environ.get("RANK", 0)) == self.rank and self.calls == self.at_call:
                message = f"injected failure on rank {self.rank}"
                raise SlowToDescribe(message, self.describe_s) if self.describe_s else ValueError(message)
        return self.lin(x)


class WaitOnRank(nn.Module):
    """A Linear that, on `rank`, blocks at its `at_call`-th forward until a file appears (a stuck rank)."""

    def __init__(self, in_dim: int = 8, out_dim: int = 1, rank: int = 1, at_call: int = 3, until: str = ""):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.rank, self.at_call, self.until, self.calls = rank, at_call, until, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if int(os.environ.get("RANK", 0)) == self.rank and self.calls == self.at_call:
                import time

                while not (self.until and Path(self.until).exists()):
                    time.sleep(0.05)
        return self.lin(x)


class GatedMLP(nn.Module):
    """launcher.models.MLP whose training forward blocks, on `rank` at call `at_call`, until the file
    `until` exists; it first creates `waiting`, so a test knows the rank is parked mid-run.
    `first_attempt_only`: do not block in workers restarted by torchrun; `in_eval`: evaluation
    forwards instead. `release_on`: signal names that also open the gate (creating `until`), once the
    launcher's own handler has taken them: a test that signals a run and then opens the gate races a
    signal relayed by an agent or by SLURM. Same weights as an MLP."""

    def __init__(
        self,
        sizes: list[int],
        rank: int = 0,
        at_call: int = 0,
        until: str = "",
        waiting: str = "",
        first_attempt_only: bool = False,
        dropout: float = 0.0,
        in_eval: bool = False,
        release_on: list[str] | None = None,
    ):
        super().__init__()
        from launcher.models import MLP

        self.net = MLP(sizes, dropout=dropout)
        self.rank, self.at_call, self.until, self.waiting = rank, at_call, until, waiting
        self.first_attempt_only = first_attempt_only
        self.in_eval = in_eval  # count (and block at) evaluation forwards instead of training ones
        self.release_on = release_on or []
        self.calls = 0

    def forward(self, x):
        if self.training != self.in_eval:
            self.calls += 1
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            if (
                self.calls == self.at_call
                and int(os.environ.get("RANK", 0)) == self.rank
                and self.until
                and not (self.first_attempt_only and restarted)
            ):
                import time

                handlers = {}
                for name in self.release_on:
                    handlers[name] = self._release_on(signal.Signals[name])
                if self.waiting:
                    Path(self.waiting).write_text(str(os.getpid()))
                while not Path(self.until).exists():
                    time.sleep(0.02)
                for name, previous in handlers.items():
                    signal.signal(signal.Signals[name], previous)
        return self.net(x)

    def _release_on(self, sig: signal.Signals):
        previous = signal.getsignal(sig)

        def release(signum, frame):
            if callable(previous):
                previous(signum, frame)  # the launcher's PreemptionFlag takes it first
            Path(self.until).touch()

        signal.signal(sig, release)
        return previous


class StuckAtExit(nn.Module):
    """launcher.models.MLP whose last reference, on `rank`, parks the process until the file `until`
    exists (creating `waiting` first): a rank stuck after its last step, before the end of the run
    (as in a user's finalizer or a dead file system). SIGTERM ends it, as it would a process stuck in
    user code that keeps no handler of its own."""

    def __init__(self, sizes: list[int], rank: int = 1, until: str = "", waiting: str = ""):
        super().__init__()
        from launcher.models import MLP

        self.net = MLP(sizes)
        self.rank, self.until, self.waiting = rank, until, waiting
        self.trained = False

    def forward(self, x):
        self.trained = self.trained or self.training
        return self.net(x)

    def __del__(self):
        if self.trained and int(os.environ.get("RANK", 0)) == self.rank:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            Path(self.waiting).write_text(str(os.getpid()))
            while not Path(self.until).exists():
                time.sleep(0.05)


class NaNOnRank(nn.Module):
    """An MLP whose output is NaN on `rank` at training forward call `at_call`."""

    def __init__(self, sizes: list[int], rank: int = 1, at_call: int = 5):
        super().__init__()
        from launcher.models import MLP

        self.net = MLP(sizes)
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at_call and int(os.environ.get("RANK", 0)) == self.rank:
                out = out * float("nan")
        return out


class NoisyRegression(torch.utils.data.Dataset):
    """launcher's synthetic Regression with fresh random noise on every fetch (like an augmentation)."""

    def __init__(self, size: int = 37, in_dim: int = 8, seed: int = 0):
        from launcher.datasets.synthetic import Regression

        self.base = Regression(size=size, in_dim=in_dim, seed=seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


class FailsToFetch(NoisyRegression):
    """NoisyRegression whose sample `at_index` is bad: the user's error, as a built-in dataset's bad
    row is (launcher.errors.ArgumentError names the recipe key)."""

    def __init__(self, at_index: int, **kwargs):
        super().__init__(**kwargs)
        self.at_index = at_index

    def __getitem__(self, i):
        if i == self.at_index:
            from launcher.errors import ArgumentError

            raise ArgumentError("at_index", f"sample {i} is bad")
        return super().__getitem__(i)


class WaitsToRead(NoisyRegression):
    """NoisyRegression whose building waits (as a long tokenization would) until the file `until`
    exists, creating `waiting` first: a test releases it when it has seen what it waits for."""

    def __init__(self, until: str, waiting: str, **kwargs):
        import time
        from pathlib import Path

        Path(waiting).touch()
        while not Path(until).exists():
            time.sleep(0.05)
        super().__init__(**kwargs)


class StreamedRegression(torch.utils.data.IterableDataset):
    """NoisyRegression as a stream: each pass a new order and fresh noise, drawn from (seed, pass)
    alone, so every rank and worker reading it sees the same stream."""

    def __init__(self, size: int = 37, in_dim: int = 8, seed: int = 0):
        from launcher.datasets.synthetic import Regression

        self.base, self.seed, self.epoch = Regression(size=size, in_dim=in_dim, seed=seed), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for i in torch.randperm(len(self.base), generator=g).tolist():
            x, y = self.base[i]
            yield x + 0.1 * torch.randn(x.shape, generator=g), y


class PaddedTokens(torch.utils.data.Dataset):
    """launcher's synthetic Tokens with a padded tail of 0 to seq_len - 1 positions per sample:
    targets there are -100, which TokenCrossEntropy ignores (the inputs are 0)."""

    deterministic = True

    def __init__(self, size: int = 37, seq_len: int = 16, vocab_size: int = 32, seed: int = 0):
        from launcher.datasets.synthetic import Tokens

        self.base, self.seq_len = Tokens(size=size, seq_len=seq_len, vocab_size=vocab_size, seed=seed), seq_len

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        pad = (i * 7) % self.seq_len
        if pad:
            x, y = x.clone(), y.clone()
            x[-pad:], y[-pad:] = 0, -100
        return x, y


class UnlabelledTokens(PaddedTokens):
    """PaddedTokens whose samples at `empty` (a list of indices, or "all") have no label at all:
    every target is -100, so a token loss's mean over such a micro-batch is 0/0."""

    def __init__(self, empty: list[int] | str = "all", **kwargs):
        super().__init__(**kwargs)
        self.empty = set(range(len(self))) if empty == "all" else set(empty)

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x, torch.full_like(y, -100)) if i in self.empty else (x, y)


class Documents(torch.utils.data.Dataset):
    """`{"input_ids": ...}` documents of the given `lengths` (ids drawn from `seed`), as a tokenized
    text dataset gives them but with nothing dropped: a document of one token is in the data."""

    deterministic = True
    needs_padding = True

    def __init__(self, lengths: list[int], vocab_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.docs = [torch.randint(3, vocab_size, (n,), generator=g) for n in lengths]

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"input_ids": self.docs[i]}


class NumberedStream(torch.utils.data.IterableDataset):
    """Samples 0, 1, ..., size - 1 as (tensor([i.]), tensor(i)) (`regression`: tensor([i.]) targets)."""

    def __init__(self, size: int = 24, regression: bool = False):
        self.size, self.regression = size, regression

    def __iter__(self):
        for i in range(self.size):
            yield torch.tensor([float(i)]), torch.tensor([float(i)]) if self.regression else torch.tensor(i)


class RecordingMLP(nn.Module):
    """launcher.models.MLP that appends the first input feature of every sample it trains on to
    `<record>.rank<RANK>`, one number per line: which samples each rank saw."""

    def __init__(self, sizes: list[int], record: str):
        super().__init__()
        from launcher.models import MLP

        self.net, self.record = MLP(sizes), record

    def forward(self, x):
        if self.training:
            with open(f"{self.record}.rank{os.environ.get('RANK', '0')}", "a") as f:
                f.writelines(f"{int(v)}\n" for v in x[:, 0].tolist())
        return self.net(x)


class SlowFirstStep(nn.Module):
    """launcher.models.MLP whose first training forward sleeps `seconds`: a first step as slow as a
    GPU's first kernels or a compile, for the start-up breakdown."""

    def __init__(self, sizes: list[int], seconds: float):
        super().__init__()
        from launcher.models import MLP

        self.net, self.seconds, self.slept = MLP(sizes), seconds, False

    def forward(self, x):
        if self.training and not self.slept:
            self.slept = True
            time.sleep(self.seconds)
        return self.net(x)


class PrivateRegression(torch.utils.data.Dataset):
    """A dataset that needs a credential (like a gated hub dataset would): it must never be written out."""

    def __init__(self, size: int = 37, api_token: str = "", seed: int = 0):
        from launcher.datasets.synthetic import Regression

        assert api_token, "a token is required"
        self.base = Regression(size=size, seed=seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


class NaNInBackward(nn.Module):
    """Finite forward, NaN gradient: sqrt of a value that is 0 makes backward divide by zero."""

    def __init__(self, in_dim: int = 8):
        super().__init__()
        self.lin = nn.Linear(in_dim, 1)

    def forward(self, x):
        return torch.sqrt(self.lin(x) * 0.0)


class RandomlyBuiltRegression(torch.utils.data.Dataset):
    """launcher's synthetic Regression that also draws from torch's global RNG when it is built, as
    many datasets do (a random split, random crops precomputed): it must not shift the model's init."""

    def __init__(self, size: int = 37, in_dim: int = 8, seed: int = 0, draws: int = 1000):
        from launcher.datasets.synthetic import Regression

        self.base = Regression(size=size, in_dim=in_dim, seed=seed)
        self.noise = torch.rand(draws)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


class UnprotectedGate(torch.utils.data.Dataset):
    """A dataset whose constructor puts SIGTERM back to its default (dying), as a worker still
    starting up would be, then blocks until the file `until` exists, having created the file
    `waiting`/<its pid> (one per rank: a test can wait until every rank is there)."""

    def __init__(self, until: str, waiting: str, size: int = 37):
        import signal
        import time

        from launcher.datasets.synthetic import Regression

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        Path(waiting).mkdir(exist_ok=True)
        (Path(waiting) / str(os.getpid())).touch()
        while not Path(until).exists():
            time.sleep(0.02)
        self.base = Regression(size=size)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def not_a_module(**kwargs):
    """A model component that returns something other than an nn.Module."""
    return {"weights": [1, 2, 3]}


class SlowToPrepare(NoisyRegression):
    """NoisyRegression whose local rank 0 prepares for `seconds` inside distributed.local_main_first
    (as TokenizedText tokenizes) while the other ranks wait; `die_rank` instead exits at once, as a
    rank killed meanwhile would."""

    def __init__(self, seconds: float = 4.0, die_rank: int | None = None, **kwargs):
        import os
        import time

        from launcher.cluster import distributed

        if die_rank is not None and int(os.environ.get("RANK", "0")) == die_rank:
            os._exit(9)
        with distributed.local_main_first("slow"):
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                time.sleep(seconds)
        super().__init__(**kwargs)


def fails_to_import_a_module(**kwargs):
    """What transformers does when torchvision is broken: the import error hides the real cause."""
    try:
        raise RuntimeError("operator torchvision::nms does not exist")
    except RuntimeError as e:
        raise ModuleNotFoundError("Could not import module 'GPT2LMHeadModel'") from e


class ScanCountingTokenFile(TokenFile):
    """A TokenFile that notes each scan for its largest id as a line of `<path>.scans`."""

    def max_token_id(self, vocab_size: int) -> int | None:
        with open(f"{self.path}.scans", "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().max_token_id(vocab_size)


class SummedSquaredError(nn.Module):
    """A loss of one's own that returns the sum over the batch (no `reduction` to read)."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().sum()


class PerSampleSquaredError(nn.Module):
    """A per-sample loss: summed over each sample's outputs, then the mean over the samples."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().flatten(1).sum(1).mean()


class SquaredErrorPerSample(nn.Module):
    """A loss of one's own that returns one number per sample."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().flatten(1).sum(1)


class SleepsOnRank(NoisyRegression):
    """NoisyRegression that, on `rank`, sleeps inside its `at_fetch`-th fetch until the file `until`
    exists (a user's dataset stuck on a slow read), creating `waiting` (holding its pid) first."""

    def __init__(self, rank: int, at_fetch: int, until: str, waiting: str, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.at_fetch, self.until, self.waiting, self.fetches = rank, at_fetch, until, waiting, 0

    def __getitem__(self, i):
        self.fetches += 1
        if self.fetches == self.at_fetch and int(os.environ.get("RANK", 0)) == self.rank:
            Path(self.waiting).write_text(str(os.getpid()))
            while not Path(self.until).exists():  # SleepsOnRank
                time.sleep(0.05)
        return super().__getitem__(i)


class ExtraCollective(nn.Module):
    """launcher.models.MLP whose training forward, on `rank` at call `at_call`, makes a collective
    that no other rank makes (an all-reduce on a group of its own, which every rank creates): the
    other ranks skip it, and the ranks then wait in different collectives. `timeout_s`: the group's."""

    def __init__(self, sizes: list[int], rank: int = 1, at_call: int = 3, timeout_s: float = 600):
        super().__init__()
        import datetime

        import torch.distributed as dist

        from launcher.models import MLP

        self.net, self.rank, self.at_call, self.calls = MLP(sizes), rank, at_call, 0
        self.side = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            if dist.is_initialized()
            else None
        )

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at_call and int(os.environ.get("RANK", 0)) == self.rank:
                import torch.distributed as dist

                dist.all_reduce(torch.zeros(1), group=self.side)
        return self.net(x)


def gated_gpt(
    rank: int = 1, at_call: int = 0, waiting: str = "", until: str = "", first_attempt_only: bool = True, **gpt: Any
) -> nn.Module:
    """launcher.models.GPT whose last block's training forward parks `rank` at its `at_call`-th call
    (creating `waiting`, holding its pid) until `until` exists; not in a worker torchrun restarted
    (`first_attempt_only`). The model stays a GPTModel with its own parameter names, so pipeline
    parallelism splits it as the plain GPT (the last block is on the last stage)."""
    from launcher.models import GPT

    model = GPT(**gpt)
    block = model[len(model) - 3]  # the last block: before the norm and the head
    forward, calls = block.forward, [0]

    def gated(x):
        if block.training:
            calls[0] += 1
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            if (
                calls[0] == at_call
                and int(os.environ.get("RANK", 0)) == rank
                and not (first_attempt_only and restarted)
            ):
                import time

                Path(waiting).write_text(str(os.getpid()))
                while not (until and Path(until).exists()):
                    time.sleep(0.02)
        return forward(x)

    block.forward = gated
    return model
