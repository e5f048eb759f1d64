"""Who am I in the job? `ClusterEnv.detect()` reads the launcher's variables once, at start-up.

Sources, in order of precedence:
  torchrun  RANK / WORLD_SIZE / LOCAL_RANK / ... (also what `accelerate launch` and our own
            `launcher run --nproc` set, since both use torch's elastic agent). Under SLURM too:
            torchrun inside srun knows the ranks of its workers, SLURM does not.
  slurm     one task per rank started by srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID ...
            (not in an interactive salloc shell, job name "bash" or "interactive", of one task)
  single    nothing set: one process, no process group
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

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
    source: str = "single"  # torchrun | slurm | single
    restart_count: int = 0  # elastic restarts of this worker group, or SLURM requeues, so far
    gpu_bound: bool = False  # SLURM gave each task its own GPU, visible as cuda:0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes the run's files and logs: rank 0. The launcher's one rank test."""
        return self.rank == 0

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> ClusterEnv:
        environ = os.environ if environ is None else environ
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls._from_torchrun(environ)
        if is_slurm_job(environ):
            return cls._from_slurm(environ)
        return cls()

    @classmethod
    def _from_torchrun(cls, e: Mapping[str, str]) -> ClusterEnv:
        world = _int(e, "WORLD_SIZE")
        env = cls(
            rank=_int(e, "RANK"),
            local_rank=_int(e, "LOCAL_RANK", 0),
            world_size=world,
            local_world_size=_int(e, "LOCAL_WORLD_SIZE", world),
            node_rank=_int(e, "GROUP_RANK", 0),
            master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_optional_int(e, "MASTER_PORT"),
            source="torchrun",
            restart_count=_int(e, "TORCHELASTIC_RESTART_COUNT", 0),
        )
        env.validate()
        return env

    @classmethod
    def _from_slurm(cls, e: Mapping[str, str]) -> ClusterEnv:
        from launcher.cluster.nodelist import first_host, tasks_per_node

        ntasks, nnodes, node_id = _int(e, "SLURM_NTASKS"), _int(e, "SLURM_NNODES", 1), _int(e, "SLURM_NODEID", 0)
        spec = e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE") or str(ntasks)
        try:
            per_node = tasks_per_node(spec)
        except ValueError as err:
            raise LaunchError("SLURM_TASKS_PER_NODE", str(err)) from None
        if sum(per_node) != ntasks:
            raise LaunchError(
                "SLURM_NTASKS",
                f"{ntasks} tasks, but SLURM_TASKS_PER_NODE={spec} adds up to {sum(per_node)}; "
                "HINT: set --ntasks to --nodes x --ntasks-per-node, or only one of them",
            )
        explicit = e.get("SLURM_NTASKS_PER_NODE")
        if explicit and explicit.isdigit() and int(explicit) * nnodes != ntasks:
            raise LaunchError(
                "SLURM_NTASKS",
                f"{ntasks} tasks, but --nodes={nnodes} x --ntasks-per-node={explicit} = "
                f"{int(explicit) * nnodes}; HINT: make --ntasks equal nodes x tasks per node",
            )
        nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
        if "MASTER_ADDR" in e:
            addr = e["MASTER_ADDR"]
        elif nodelist:
            try:
                addr = first_host(nodelist)
            except ValueError as err:
                raise LaunchError(
                    "SLURM_JOB_NODELIST", f"{err}; HINT: set MASTER_ADDR to the first node's address"
                ) from None
        else:
            raise LaunchError("SLURM_JOB_NODELIST", "is not set, so the first node is unknown; HINT: set MASTER_ADDR")
        job_id = _int(e, "SLURM_JOB_ID", 0)
        env = cls(
            rank=_int(e, "SLURM_PROCID"),
            local_rank=_int(e, "SLURM_LOCALID", 0),
            world_size=ntasks,
            local_world_size=per_node[node_id] if node_id < len(per_node) else per_node[0],
            node_rank=node_id,
            master_addr=addr,
            # one port per job, so that jobs sharing a head node do not collide
            master_port=_optional_int(e, "MASTER_PORT") or 15000 + job_id % 20000,
            source="slurm",
            restart_count=_int(e, "SLURM_RESTART_COUNT", 0),
            gpu_bound=cls.gpu_per_task(e),
        )
        env.validate()
        env._check_slurm_gpus()
        return env

    def _check_slurm_gpus(self) -> None:
        """The usual SLURM layouts that leave GPUs idle or oversubscribed, caught before they hang."""
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0 or self.gpu_bound:
            return
        if self.local_world_size > gpus:
            raise LaunchError(
                "SLURM_NTASKS_PER_NODE",
                f"{self.local_world_size} tasks on this node but {gpus} GPU(s); "
                f"HINT: use --ntasks-per-node={gpus} (one task per GPU)",
            )
        if self.local_world_size == 1 and gpus > 1:
            raise LaunchError(
                "SLURM_NTASKS_PER_NODE",
                f"one task on this node, which has {gpus} GPUs, and no torchrun "
                f"to start a worker per GPU; HINT: use --ntasks-per-node={gpus} "
                "(slurm/per_gpu.sbatch), or run torchrun in each task (slurm/multi_node.sbatch)",
            )

    @staticmethod
    def gpu_per_task(e: Mapping[str, str]) -> bool:
        """SLURM bound one GPU to each task (--gpus-per-task=1): every task sees its GPU as cuda:0."""
        visible = e.get("CUDA_VISIBLE_DEVICES", "")
        return e.get("SLURM_GPUS_PER_TASK") == "1" or (bool(visible) and "," not in visible and "SLURM_STEP_GPUS" in e)

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
        return (
            f"{self.source}: rank {self.rank}/{self.world_size}, local rank {self.local_rank}/{self.local_world_size}"
        )


def is_slurm_job(e: Mapping[str, str]) -> bool:
    if "SLURM_PROCID" not in e or "SLURM_NTASKS" not in e:
        return False
    interactive = e.get("SLURM_JOB_NAME") in ("bash", "interactive")
    # an salloc shell (or srun --pty bash) is a place to type commands, not a job of N ranks;
    # `srun -n 4 launcher run` from inside it is, and shows as more than one task
    return not interactive or e.get("SLURM_NTASKS") not in ("1", None)


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The variable's integer value; `default` if it is unset, and an error if there is none."""
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchError(name, "is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(name, f"expected an integer, got {value!r}") from None


def _optional_int(environ: Mapping[str, str], name: str) -> int | None:
    return _int(environ, name) if environ.get(name) else None
