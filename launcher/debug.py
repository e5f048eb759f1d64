"""Helpers for `launcher debug`."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.logs import log

_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))(torch.ones(1, 2)).sum().backward()
dist.destroy_process_group()
"""


def distributed_debug_level() -> str:
    """DETAIL, if DDP survives it in this torch: 2.14 segfaults constructing DDP on gloo under DETAIL
    (a torch bug; found by this probe, which costs one 2-process start-up). Otherwise INFO."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(_PROBE)
        env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(probe)]
        try:
            ok = subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    if not ok:
        import torch
        log.warning(f"TORCH_DISTRIBUTED_DEBUG=DETAIL crashes DDP with torch {torch.__version__} here; using INFO")
    return "DETAIL" if ok else "INFO"
