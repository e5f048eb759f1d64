"""Who am I in the job? `ClusterEnv.detect()` reads the launcher's variables once, at start-up.

Sources, in order of precedence:
  torchrun  RANK / WORLD_SIZE / LOCAL_RANK / ... (also what `accelerate launch` and our own
            `launcher run --nproc` set, since both use torch's elastic agent)
  single    nothing set: one process, no process group
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from launcher.errors import LaunchError


@dataclass(frozen=True)
class ClusterEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    source: str = "single"  # torchrun | single
    restart_count: int = 0  # elastic restarts of this worker group so far

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> "ClusterEnv":
        environ = os.environ if environ is None else environ
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls._from_torchrun(environ)
        return cls()

    @classmethod
    def _from_torchrun(cls, e: Mapping[str, str]) -> "ClusterEnv":
        world = _int(e, "WORLD_SIZE")
        env = cls(
            rank=_int(e, "RANK"),
            local_rank=_int(e, "LOCAL_RANK", 0),
            world_size=world,
            local_world_size=_int(e, "LOCAL_WORLD_SIZE", world),
            node_rank=_int(e, "GROUP_RANK", 0),
            master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(e, "MASTER_PORT", None),
            source="torchrun",
            restart_count=_int(e, "TORCHELASTIC_RESTART_COUNT", 0),
        )
        env.validate()
        return env

    def validate(self) -> None:
        if self.world_size < 1:
            raise LaunchError("WORLD_SIZE", f"must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise LaunchError("RANK", f"{self.rank} is outside 0..{self.world_size - 1} (WORLD_SIZE={self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchError("LOCAL_RANK", f"{self.local_rank} is outside 0..{self.local_world_size - 1}")
        if self.is_distributed and self.master_port is None:
            raise LaunchError("MASTER_PORT", "is not set; start the job with torchrun or `launcher run --nproc N`")

    def describe(self) -> str:
        return f"{self.source}: rank {self.rank}/{self.world_size}, local rank {self.local_rank}/{self.local_world_size}"


def _int(environ: Mapping[str, str], name: str, default: int | None | type = KeyError) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        if default is KeyError:
            raise LaunchError(name, "is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(name, f"expected an integer, got {value!r}") from None
