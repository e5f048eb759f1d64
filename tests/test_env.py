"""Environment detection: what started this process, and who it is in the job."""

from __future__ import annotations

import pytest

from launcher.cluster.distributed import pick_backend
from launcher.cluster.env import ClusterEnv
from launcher.errors import LaunchError

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RESTART_COUNT": "2",
}


def test_single_process_when_nothing_is_set():
    env = ClusterEnv.detect({})
    assert (env.rank, env.world_size, env.source, env.is_distributed) == (0, 1, "single", False)


def test_torchrun_variables():
    env = ClusterEnv.detect(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (3, 1, 8, 2, 1)
    assert (env.master_addr, env.master_port, env.source, env.restart_count) == ("node0", 29500, "torchrun", 2)


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"RANK": "x"}, "RANK"),
        ({"RANK": "8"}, "RANK"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"MASTER_PORT": ""}, "MASTER_PORT"),
    ],
)
def test_bad_torchrun_variables_name_the_variable(changes, key):
    with pytest.raises(LaunchError) as e:
        ClusterEnv.detect({**TORCHRUN, **changes})
    assert e.value.key == key


def test_backend_auto_is_gloo_on_cpu_and_nccl_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; covered by the GPU tests")
    assert pick_backend("auto", 0) == ("gloo", torch.device("cpu"))
    assert pick_backend("gloo", 1, 2) == ("gloo", torch.device("cpu"))
    with pytest.raises(LaunchError, match="nccl needs one GPU per local rank"):
        pick_backend("nccl", 0)
