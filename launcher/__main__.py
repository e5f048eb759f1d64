from launcher.observe import startup

startup.mark("python")
import torch  # noqa: E402,F401  (timed: the floor of any PyTorch program's start-up)

startup.mark("torch")
from launcher.commands.cli import entry  # noqa: E402

entry()
