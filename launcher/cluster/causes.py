"""A worker's cause of failure, in the file torch's elastic agent gives it (TORCHELASTIC_ERROR_FILE).

A failing rank records its error *before* it tears down its process group: its peers notice the
failure only then, and the agent may see one of them exit first and stop the failing rank before
its exception reaches `record` (torch reports only the ranks that had exited by then). So the parent
reads every rank's file from the last attempt's log directory, not only the exited ranks'.

The file is torch's ErrorHandler format (torchrun reads it too), written atomically (torch raises on
a half-written one), plus the exit code the rank is about to exit with.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from launcher.storage import atomic_write

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


@dataclass(frozen=True)
class Cause:
    rank: int
    message: str  # "ExceptionType: first line"
    timestamp_s: int  # when it was recorded, seconds since the epoch
    exit_code: int | None  # None: recorded by torch's own `record`, which exits 1


def record(exc: BaseException, exit_code: int) -> None:
    """Leave `exc` where the agent (ours or torchrun) looks for this worker's root cause."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(exc)),
                "timestamp": str(int(time.time())),
                "exit_code": exit_code,
            },
        }
    }
    with contextlib.suppress(OSError):  # a report that cannot be written must not hide the error itself
        atomic_write(Path(path), lambda f: f.write(json.dumps(data).encode()))


def read(path: Path, rank: int) -> Cause | None:
    """The cause in one error file, or None if there is none (or it cannot be read)."""
    try:
        data = json.loads(path.read_text())
        message = data["message"]
        if isinstance(message, str):
            text, extra = message, {"timestamp": data.get("timestamp", 0)}
        else:
            text, extra = message["message"], message.get("extraInfo", {})
        code = extra.get("exit_code")
        lines = str(text).strip().splitlines()
        return Cause(rank, lines[0] if lines else "no error message", int(extra.get("timestamp", 0)), code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def last_attempt(log_dir: Path) -> dict[int, Cause]:
    """Every rank's recorded cause in the newest attempt under an agent's `log_dir`
    (torch lays it out as <log_dir>/<run id>_<random>/attempt_<n>/<local rank>/error.json)."""
    attempts = [p for p in log_dir.glob("*/attempt_*") if p.name.partition("_")[2].isdigit()]
    if not attempts:
        return {}
    newest = max(attempts, key=lambda p: int(p.name.partition("_")[2]))
    causes = {}
    for rank_dir in newest.iterdir():
        if rank_dir.name.isdigit() and (cause := read(rank_dir / "error.json", int(rank_dir.name))) is not None:
            causes[cause.rank] = cause
    return causes
