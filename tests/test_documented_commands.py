"""Every `launcher` command written in README.md and docs/ works as written, with the shipped recipes.

Commands that need a GPU, a cluster or a container are `check`ed at the world size they would run
(`--nproc`, `--nproc-per-node` x `--nnodes`, `--nodes` x `--gpus-per-node`); `launcher slurm` renders
its script (without `--submit`); `launcher check` and `launcher run` on CPU recipes run as written
elsewhere in the suite (test_recipes.py, the README quickstart)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each shell line of README.md and docs/*.md that runs the launcher."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip().rstrip("&").strip()
                if line and not line.startswith("#") and re.search(r"(^|\s)(-m )?launcher\s", line + " "):
                    found.append((path.name, line))
    return found


def as_check(command: str) -> tuple[list[str], str]:
    """The launcher arguments to run here for a documented command, and what they stand for."""
    words = shlex.split(command)
    for part in command.split(" && "):  # quoted arguments keep their spaces
        if "launcher" in part and "pip install" not in part:
            words = shlex.split(part)
    if words[0] == "torchrun":
        nproc = int(_option(words, "--nproc-per-node", "1")) * int(_option(words, "--nnodes", "1"))
        rest = words[words.index("-m") + 2 :]
        assert rest[0] == "run", command
        return ["check", *rest[1:], "--nproc", str(nproc)], f"torchrun at world size {nproc}"
    if words[0] == "docker":
        if words[1] == "build":
            return [], "builds the image (tests/test_docker.py lints the Dockerfile)"
        rest = words[words.index("launcher", words.index("run") + 1) + 1 :]
        return _launcher(rest, command)
    assert words[0] == "launcher", command
    return _launcher(words[1:], command)


def _launcher(args: list[str], command: str) -> tuple[list[str], str]:
    sub, rest = args[0], args[1:]
    if sub == "run":
        nproc = _option(rest, "--nproc", "1")
        rest = _drop(rest, "--nproc", "--max-restarts")
        return ["check", *rest, "--nproc", nproc], f"run at world size {nproc}"
    if sub == "check":
        return args, "as written"
    if sub == "slurm":
        return ["slurm", *[a for a in rest if a != "--submit"]], "rendered, not submitted"
    if sub == "debug":
        nproc = "2" if "--distributed" in rest else _option(rest, "--simulate-world-size", "1")
        rest = _drop([a for a in rest if a != "--distributed"], "--steps", "--simulate-world-size")
        return ["check", *rest, "--nproc", nproc], f"debug at world size {nproc} (tests/test_observability.py runs it)"
    if sub == "verify":
        nproc = str(max(_ranks(layout) for layout in rest[rest.index("--layouts") + 1 :] if not layout.startswith("-")))
        rest = _drop(rest, "--steps", "--rtol")
        rest = [
            a
            for a in rest[: rest.index("--layouts")] + rest[rest.index("--layouts") + 1 :]
            if "=" in a or a.endswith(".yaml")
        ]
        return ["check", *rest, "--nproc", nproc], "verify's largest layout (tests/test_verify.py runs it)"
    if sub == "doctor":
        return [], "needs the job it checks (tests/test_launchers.py runs the doctor)"
    if sub == "plot":
        return [], "needs finished runs (tests/test_observability.py plots them)"
    if sub == "convert":
        return [], "needs a checkpoint (tests/test_sharding.py converts them)"
    if sub == "export":
        return [], "needs a run's checkpoints (tests/test_finetune.py exports them)"
    if sub == "tokenize":
        return [], "needs text and a tokenizer (tests/test_token_files.py tokenizes)"
    raise AssertionError(f"a documented command this test does not know how to check: {command}")


def _ranks(layout: str) -> int:
    """verify's layout `fsdp:2,tp:2`: 4 ranks; `1`: one; anything else: 1 (the option's value)."""
    n = 1
    for part in layout.split(","):
        n *= int(part.partition(":")[2] or 1) if ":" in part else 1
    return n


def _option(words: list[str], name: str, default: str) -> str:
    return words[words.index(name) + 1] if name in words else default


def _drop(words: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in names:
            skip = True
        else:
            out.append(w)
    return out


COMMANDS = documented_commands()
# the same check stands for several documented lines (README and docs repeat `run --nproc 8 gpt.yaml`)
CHECKS: dict[tuple[str, ...], list[str]] = {}
for _source, _command in COMMANDS:
    CHECKS.setdefault(tuple(as_check(_command)[0]), []).append(f"{_source}: {_command}")


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 10, COMMANDS
    assert any("slurm" in c for _, c in COMMANDS) and any(c.startswith("torchrun") for _, c in COMMANDS)


@pytest.mark.parametrize("args", list(CHECKS), ids=[CHECKS[a][0][:80] for a in CHECKS])
def test_documented_command_works_with_the_shipped_recipes(tmp_path, monkeypatch, capsys, args):
    from launcher.commands import cli

    lines = CHECKS[args]
    if not args:
        pytest.skip(as_check(lines[0].split(": ", 1)[1])[1])
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # as from a clone, writing runs/ here
    monkeypatch.chdir(tmp_path)
    if "recipes/sft_lora.yaml" in args:  # the second step: it fine-tunes what recipes/hf_causal_lm.yaml exports
        from hfkit import example_base

        example_base(tmp_path)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    # hub ids in the overrides, or in the recipe the command names (recipes/sft_lora_hub.yaml)
    recipes = [Path(ROOT, a).read_text() for a in args if a.endswith(".yaml") and Path(ROOT, a).is_file()]
    hub_ids = re.findall(r"pretrained[=:] *([\w.-]+/[\w.-]+)", " ".join([*args, *recipes]))
    if hub_ids and code == 2:
        # a hub model cannot be fetched here (offline): the recipe and overrides held up to the
        # model, which is refused in the one line that names it and says how to fetch it
        assert f"{hub_ids[0]} is neither a local directory" in err and "HF_HUB_OFFLINE=1" in err, err
        return
    assert code == 0, f"{lines}\n(as: launcher {' '.join(args)})\n{err}"
    if args[0] == "slurm":
        assert Path(tmp_path, out.split()[0]).is_file()
