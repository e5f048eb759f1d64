"""The training step written by hand, profiled like the launcher's (`log.profile`), for
tests/test_step_path.py: python hand_written_step.py OUT_DIR PRECISION CLIP

The same model, data, optimizer and loss as the test's recipe, in the plainest loop there is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from launcher.datasets.synthetic import Regression
from launcher.models import MLP
from launcher.observe.profiling import StepProfiler

out, precision, clip = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if sys.argv[3] != "none" else None
torch.manual_seed(0)
model = MLP([8, 32, 32, 1])
opt = torch.optim.AdamW(model.parameters(), lr=0.01)
loss_fn = torch.nn.MSELoss()
data = torch.utils.data.DataLoader(Regression(size=512, in_dim=8), batch_size=8, shuffle=True, drop_last=True)
prof = StepProfiler(out, "hand", torch.device("cpu"), start_step=3, steps=4, memory=True)
prof.after_step(0)
for i, (x, y) in enumerate(data):
    x, y = x.to("cpu", non_blocking=True), y.to("cpu", non_blocking=True)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
    else:
        loss = loss_fn(model(x), y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    prof.after_step(i + 1)
    if prof.done:
        break
