"""An installed package that breaks others. A torchvision built for another torch fails to import
(`RuntimeError: operator torchvision::nms does not exist`), and transformers imports torchvision
whenever it is installed, so every transformers recipe fails too, with an error about a model class
("Could not import module 'GPT2LMHeadModel'") that gives no fix. Said here once, with the fix, for
`launcher doctor` and for a recipe's component that fails because of it."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

# the CPU and CUDA builds of torch and torchvision come from torch's own index, by the build's tag
TORCH_INDEX = "https://download.pytorch.org/whl"


def torchvision_broken() -> str | None:
    """Why torchvision cannot be imported, with the fix; None if it is not installed or imports."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # noqa: BLE001 - any failure to import it is the finding
        return _hint(e)
    return None


def blames_torchvision(exc: BaseException) -> str | None:
    """The torchvision fix when `exc` (or what it was raised from) comes from a torchvision that
    cannot be imported; None otherwise."""
    inner: BaseException | None = exc
    seen = set()
    while inner is not None and id(inner) not in seen:
        if "torchvision" in str(inner):
            return torchvision_broken()
        seen.add(id(inner))
        inner = inner.__cause__ if inner.__cause__ is not None or inner.__suppress_context__ else inner.__context__
    return None


def _hint(error: Exception) -> str:
    import torch

    torch_version = torch.__version__
    release, _, build = torch_version.partition("+")
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    pin = matching_torchvision(release)
    index = f" --index-url {TORCH_INDEX}/{build}" if build else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"torchvision {version} does not match torch {torch_version} (importing it fails: {type(error).__name__}: "
        f"{first}): install the torchvision built for this torch (pip install "
        f"{f'torchvision=={pin}' if pin else 'torchvision'}{index}), or, where no recipe reads images, remove it "
        "(pip uninstall torchvision): only the vision recipes need it, but transformers imports it whenever it "
        "is installed"
    )


def matching_torchvision(torch_release: str) -> str | None:
    """The torchvision release made with a torch 2.x release (torch 2.4.1: torchvision 0.19.1)."""
    found = re.match(r"^2\.(\d+)\.(\d+)", torch_release)
    return f"0.{int(found[1]) + 15}.{found[2]}" if found else None
