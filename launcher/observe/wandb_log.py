"""wandb, on rank 0 only. Never prompts (offline unless an API key is configured), never blocks
training (a failed start is a warning), and keeps one run across resumes, restarts and requeues:
the run id lives in <run.dir>/wandb_run_id and in every checkpoint, and is reused with resume="allow".
"""

from __future__ import annotations

import netrc
import os
import sys
import uuid
from pathlib import Path
from typing import Literal, cast

from launcher.errors import RecipeError
from launcher.observe.logs import log
from launcher.recipe.schema import Recipe, redact

Mode = Literal["online", "offline", "disabled"]

ID_FILE = "wandb_run_id"


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


PROBE_TIMEOUT_S = 3.0


def server_answers(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Does the wandb server answer HTTP within `timeout_s`? (Any status counts: it is there.)
    Run in a thread so that a DNS lookup, which no socket timeout covers, cannot hold start-up."""
    import threading
    import urllib.error
    import urllib.request

    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(base_url, timeout=timeout_s).close()
            answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except Exception:  # noqa: BLE001 - unreachable, refused, reset, timed out: all the same answer
            pass

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


def resolve_mode(mode: str) -> Mode:
    if mode == "auto":
        if not has_api_key():
            return "offline"
        base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if not server_answers(base_url):
            log.warning(
                f"log.wandb: {base_url} did not answer within {PROBE_TIMEOUT_S:g} s; logging offline "
                "(sync later with `wandb sync`)"
            )
            return "offline"
        return "online"
    if mode == "online" and not has_api_key():
        raise RecipeError(
            "log.wandb.mode",
            "online needs an API key (WANDB_API_KEY, or `wandb login`); "
            "use offline (sync later with `wandb sync`) or auto",
        )
    return cast(Mode, mode)  # the recipe's schema allows only these and auto


def run_id(run_dir: Path, from_checkpoint: str | None, continuing: bool) -> str:
    """The checkpoint's id, else (for a restart before any checkpoint) the run directory's, else a new one."""
    path = run_dir / ID_FILE
    if from_checkpoint:
        chosen = from_checkpoint
    elif continuing and path.exists():
        chosen = path.read_text().strip()
    else:
        chosen = uuid.uuid4().hex[:12]
    from launcher.storage import atomic_write

    atomic_write(path, lambda f: f.write((chosen + "\n").encode()))  # never a torn, empty id
    return chosen


def redact_argv(argv: list[str]) -> list[str]:
    """`key.path=value` arguments whose key looks secret (token, api_key, ...) with the value hidden."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith("-"):
            arg = f"{key}={redact({key.rsplit('.', 1)[-1]: value})[key.rsplit('.', 1)[-1]]}"
        out.append(arg)
    return out


class WandbSink:
    def __init__(self, recipe: Recipe, run_dir: Path, run_id_: str) -> None:
        cfg = recipe.log.wandb
        assert cfg is not None  # built only when log.wandb is set
        mode = resolve_mode(cfg.mode)
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning(
                "log.wandb is set but wandb is not installed (pip install wandb); training continues without it"
            )
            return
        # wandb records the command line; overrides such as model.hf_token=... must not be in it
        sys.argv[:] = redact_argv(sys.argv)
        try:
            self.run = wandb.init(
                id=run_id_,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                project=cfg.project or recipe.name,
                entity=cfg.entity,
                name=cfg.name or recipe.name,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                config=recipe.to_dict(),
                settings=wandb.Settings(silent=True, console="off", init_timeout=90, disable_git=True),
            )
        except Exception as e:  # noqa: BLE001 - wandb must never stop a training run
            log.warning(f"wandb could not start ({type(e).__name__}: {e}); training continues without it")

    def __call__(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def preempting(self) -> None:
        if self.run is not None:
            self.run.mark_preempting()

    def close(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
