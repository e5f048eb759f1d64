"""SLURM detection: nodelists, rank mapping, precedence, and the layouts that would hang."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from launcher.cluster.env import ClusterEnv
from launcher.cluster.nodelist import expand, first_host, tasks_per_node
from launcher.errors import LaunchError

NODELISTS = {
    "node1": ["node1"],
    "gpu[01-04,07],cpu3": ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"],
    "n[1-3]": ["n1", "n2", "n3"],
    "n[001-003]": ["n001", "n002", "n003"],
    "node[9-11]": ["node9", "node10", "node11"],
    "node[09-11]": ["node09", "node10", "node11"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "a,b,c": ["a", "b", "c"],
    "host-with-dash[1,3]": ["host-with-dash1", "host-with-dash3"],
    "x[1]": ["x1"],
    "gpu-a100-[1-2],gpu-h100-3": ["gpu-a100-1", "gpu-a100-2", "gpu-h100-3"],
    "nid[00010-00012]": ["nid00010", "nid00011", "nid00012"],
    "login1.cluster.org": ["login1.cluster.org"],
    "c[1-2,5],g[10-11]": ["c1", "c2", "c5", "g10", "g11"],
}


@pytest.mark.parametrize("nodelist,hosts", NODELISTS.items(), ids=list(NODELISTS))
def test_nodelist_expansion(nodelist, hosts):
    assert expand(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize("nodelist", list(NODELISTS), ids=list(NODELISTS))
def test_parser_agrees_with_scontrol(nodelist):
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    assert expand(nodelist) == out.stdout.split()
    assert first_host(nodelist) == out.stdout.split()[0]


@pytest.mark.parametrize("bad", ["n[1-", "n[3-1]", "n[a-b]", "n]1["])
def test_bad_nodelists_raise(bad):
    with pytest.raises(ValueError):
        expand(bad)


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]


def slurm(**changes) -> dict:
    e = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "train",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
    }
    e.update(changes)
    return {k: v for k, v in e.items() if v is not None}


needs_no_gpu = pytest.mark.skipif(
    torch.cuda.device_count() > 0, reason="these describe a CPU node; on a GPU machine its layout checks apply"
)


@needs_no_gpu
def test_slurm_variables_map_to_ranks():
    env = ClusterEnv.detect(slurm())
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (
        "slurm",
        5,
        1,
        8,
        2,
        2,
    )
    assert env.master_addr == "gpu01"  # the first host, not this one: every node agrees on rank 0's address
    assert env.master_port == 15000 + 123456 % 20000
    assert ClusterEnv.detect(slurm(MASTER_PORT="29500", MASTER_ADDR="10.0.0.1")).master_port == 29500
    assert ClusterEnv.detect(slurm(SLURM_RESTART_COUNT="2")).restart_count == 2


def test_torchrun_inside_srun_wins():
    env = ClusterEnv.detect({**slurm(), "RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "MASTER_PORT": "1"})
    assert (env.source, env.world_size) == ("torchrun", 16)


@needs_no_gpu
def test_interactive_salloc_shell_is_not_a_job_but_srun_inside_it_is():
    shell = slurm(
        SLURM_JOB_NAME="interactive",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_TASKS_PER_NODE="1",
        SLURM_NTASKS_PER_NODE=None,
        SLURM_NNODES="1",
        SLURM_NODEID="0",
    )
    assert ClusterEnv.detect(shell).source == "single"
    assert ClusterEnv.detect({**shell, "SLURM_JOB_NAME": "bash"}).source == "single"
    two = {**shell, "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    assert ClusterEnv.detect(two).source == "slurm"


@pytest.mark.parametrize(
    "changes,key,phrase",
    [
        ({"SLURM_NTASKS": "6"}, "SLURM_NTASKS", "adds up to 8"),
        ({"SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "2(x3)"}, "SLURM_NTASKS", "--ntasks-per-node=2 = 8"),
        ({"SLURM_PROCID": "9"}, "RANK", "outside"),
        ({"SLURM_JOB_NODELIST": "gpu[01-"}, "SLURM_JOB_NODELIST", "MASTER_ADDR"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST", "MASTER_ADDR"),
    ],
)
def test_slurm_mismatches_are_errors_with_a_hint(changes, key, phrase):
    with pytest.raises(LaunchError) as e:
        ClusterEnv.detect(slurm(**changes))
    assert e.value.key == key and phrase in e.value.message


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one GPU")
def test_more_tasks_than_gpus_on_a_node_is_an_error():
    with pytest.raises(LaunchError, match="2 tasks on this node but 1 GPU"):
        ClusterEnv.detect(slurm())
    bound = ClusterEnv.detect(slurm(SLURM_GPUS_PER_TASK="1"))  # each task has its own GPU
    assert bound.gpu_bound
