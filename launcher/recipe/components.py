"""`{_component_: pkg.mod.Name, **kwargs}` -> an object, with errors that name the recipe key.

`check` validates the keyword arguments against the component's signature without building it, so
`launcher check` catches `optimizer.betaz` before any process starts. `instantiate` builds it,
passing runtime arguments (the parameters, the optimizer, ...) the recipe cannot name.
Nested dicts with `_component_` inside the arguments are built first.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

from launcher.errors import ArgumentError, BuildError, LaunchError, RecipeError
from launcher.recipe import installed
from launcher.recipe.schema import suggest

TARGET = "_component_"


def resolve(target: str, key: str) -> Callable:
    """Import `pkg.mod.Name` (or `pkg.mod.Class.attr`): the longest importable module prefix, then attributes."""
    parts = target.split(".")
    module, error = None, None
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError as e:
            # only "this prefix does not exist" means try a shorter one; a missing dependency is the answer
            if e.name is None or not ".".join(parts[:cut]).startswith(e.name):
                raise RecipeError(
                    f"{key}.{TARGET}", f"importing {target} failed: {e}; {install_hint(e.name)}"
                ) from None
            if cut == 1 and e.name in EXTRAS:  # a known optional dependency that is not installed
                raise RecipeError(
                    f"{key}.{TARGET}", f"{target} needs {e.name}, which is not installed; {install_hint(e.name)}"
                ) from None
            error = e
        except Exception as e:  # the module exists but fails to import: report, do not hide it
            if debugging():
                raise
            cause = transformers_torch_off() or installed.blames_torchvision(e)
            if cause is not None:  # behind peft's or a model's import error: the real cause
                raise RecipeError(f"{key}.{TARGET}", f"importing {target} failed: {cause}") from None
            raise RecipeError(
                f"{key}.{TARGET}",
                f"importing {'.'.join(parts[:cut])} failed at {where(e)}: "
                f"{type(e).__name__}: {first_line(e)}{root_cause(e)} {DEBUG_HINT}",
            ) from None
    if module is None:
        raise RecipeError(
            f"{key}.{TARGET}",
            f"cannot import {target!r} ({error}); looked in {os.getcwd()} (the "
            "working directory) and the installed packages: check the spelling, run "
            "from the directory that holds the module, or install its package",
        )
    obj: Any = module
    for depth in range(cut, len(parts)):
        name = parts[depth]
        if not hasattr(obj, name):
            owner = ".".join(parts[:depth])
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise RecipeError(f"{key}.{TARGET}", f"{owner} has no {name!r}{suggest(name, public)}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise RecipeError(f"{key}.{TARGET}", f"{target} is not a class or function")
    return obj


# optional dependencies, by the extra that installs them (pyproject.toml)
EXTRAS = {name: "hf" for name in ("transformers", "datasets", "tokenizers", "safetensors", "peft")} | {
    "torchvision": "vision"
}


def install_hint(module: str | None) -> str:
    extra = EXTRAS.get((module or "").split(".")[0])
    if extra is not None:
        return f"install the [{extra}] extra: pip install 'launcher[{extra}]'"
    return "install the missing package"


def transformers_torch_off() -> str | None:
    """Why transformers cannot use this torch, or None. transformers turns its PyTorch support off
    under a torch older than it needs (5.x: 2.6), and then peft and the models fail with unrelated
    errors (NameError: name 'nn' is not defined)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers
    from transformers.utils import is_torch_available

    if is_torch_available():
        return None
    return (
        f"transformers {transformers.__version__} has turned its PyTorch support off: it needs a newer "
        f"torch than {torch.__version__}; upgrade torch, or install a transformers release that supports it"
    )


def require(module: str, needed_by: str) -> Any:
    """Import an optional dependency inside a component; if absent, one line (for the component's
    key, through `instantiate`) naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise
        raise ArgumentError(
            TARGET, f"{needed_by} needs {module}, which is not installed; {install_hint(module)}"
        ) from None


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return None


def check(spec: dict[str, Any], key: str, n_runtime: int = 0) -> Callable:
    """Resolve the component and check its keyword arguments (recursively) without calling it.
    The first `n_runtime` positional parameters are supplied by the launcher (params, optimizer, ...)."""
    target = resolve(spec[TARGET], key)
    kwargs = {k: v for k, v in spec.items() if k != TARGET}
    for name, value in kwargs.items():
        if isinstance(value, dict) and TARGET in value:
            check(value, f"{key}.{name}")
    sig = _signature(target)
    if sig is None:
        return target
    params = sig.parameters
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    runtime = positional[:n_runtime]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in kwargs:
        if name in runtime:
            raise RecipeError(f"{key}.{name}", "is passed by the launcher at build time; remove it from the recipe")
        if name not in named and not accepts_any:
            raise RecipeError(
                f"{key}.{name}",
                f"{spec[TARGET]} takes no argument {name!r}{suggest(name, named)} "
                f"(it takes: {', '.join(n for n in named if n not in runtime)})",
            )
    for name, p in params.items():
        required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and name not in kwargs and name not in runtime:
            raise RecipeError(f"{key}.{name}", f"{spec[TARGET]} needs this argument; add it to the recipe")
    return target


def instantiate(spec: dict[str, Any], key: str, *args: Any, **runtime: Any) -> Any:
    """Build the component. Failures inside its constructor are reported against `key`, as the
    recipe's arguments are by far the likeliest cause; LAUNCHER_DEBUG=1 shows the traceback instead."""
    target = resolve(spec[TARGET], key)
    kwargs = {}
    for name, value in spec.items():
        if name == TARGET:
            continue
        kwargs[name] = instantiate(value, f"{key}.{name}") if isinstance(value, dict) and TARGET in value else value
    try:
        return target(*args, **kwargs, **runtime)
    except (RecipeError, LaunchError):  # already names its key (a nested component, a missing extra, a variable)
        raise
    except ArgumentError as e:  # a built-in component's complaint about one of its arguments
        raise BuildError(f"{key}.{e.argument}" if e.argument else key, str(e), e) from None
    except Exception as e:
        if debugging():
            raise
        if (broken := installed.blames_torchvision(e)) is not None:  # transformers imports torchvision
            raise BuildError(key, f"building {spec[TARGET]} failed: {broken}", e) from None
        if isinstance(e, TypeError) and not runtime:
            # the recipe's arguments against the signature, as `launcher check` words it (an unknown
            # or missing argument), rather than Python's TypeError; passes if the cause lies deeper
            check(spec, key, len(args))
        raise BuildError(
            key,
            f"building {spec[TARGET]} failed at {where(e)}: {type(e).__name__}: {first_line(e)}{root_cause(e)} "
            f"{DEBUG_HINT}",
            e,
        ) from None


DEBUG_HINT = "(LAUNCHER_DEBUG=1 shows the traceback)"


def debugging() -> bool:
    """LAUNCHER_DEBUG=1: user errors raised from the user's code keep their traceback."""
    return os.environ.get("LAUNCHER_DEBUG") == "1"


def root_cause(exc: BaseException) -> str:
    """`; caused by X: ...`, the innermost exception behind `exc` (what made an import fail, say:
    transformers reports only that a module could not be imported), or "" when it is `exc` itself."""
    inner, seen = exc, {id(exc)}
    while (nxt := _reason(inner)) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(inner))
    return "" if inner is exc else f"; caused by {type(inner).__name__}: {first_line(inner)}"


def _reason(exc: BaseException) -> BaseException | None:
    """What `exc` was raised from, or during; not a context that `raise ... from None` dropped."""
    return exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def where(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc` (for a SyntaxError: the offending line)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    # the innermost line of the user's own code, rather than of torch or Python, which it called
    import torch

    libraries = (
        os.path.dirname(os.__file__),
        os.path.dirname(os.path.dirname(__file__)),
        os.path.dirname(torch.__file__),
    )
    own = [f for f in frames if not f[0].startswith(libraries) and not f[0].startswith("<frozen")]
    if not (own or frames):
        return "an unknown place"
    filename, line = (own or frames)[-1]
    return f"{filename}:{line}"


def resolve_callable(spec: dict[str, Any], key: str) -> Callable:
    """A function named by the recipe and called later by torch (a DDP comm hook): kwargs are bound."""
    fn = resolve(spec[TARGET], key)
    kwargs = {k: v for k, v in spec.items() if k != TARGET}
    return functools.partial(fn, **kwargs) if kwargs else fn
