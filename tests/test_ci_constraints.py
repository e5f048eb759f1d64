"""CI installs pinned versions (.ci/constraints), moved only by scripts/refresh-constraints (issue #37)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT

CONSTRAINTS = ROOT / ".ci" / "constraints"


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (CONSTRAINTS / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s;]+", line), f"{name}.txt: not an exact pin: {line!r}"
            package, _, version = line.partition("==")
            found[canonicalize_name(package)] = version
    return found


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r)
        for r in [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    ]


def test_each_stack_pins_every_requirement_within_pyproject_ranges():
    """A requirement left unpinned would be resolved anew on the day of a landing; a pin outside
    pyproject.toml's range means the two were edited apart (refresh-constraints writes them)."""
    for stack, extras in {"newest": ("lint", "test"), "oldest": ("test",)}.items():
        pinned = pins(stack)
        for req in requirements(*extras):
            name = canonicalize_name(req.name)
            assert name in pinned, f"{stack}.txt does not pin {req.name}"
            assert req.specifier.contains(pinned[name], prereleases=True), (
                f"{stack}.txt: {name}=={pinned[name]} vs {req}"
            )
    assert pins("oldest")["torch"] == "2.4.1" and pins("newest")["torch"] != "2.4.1"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index('PIP_CONSTRAINT="$PWD/.ci/constraints/newest.txt"') < ci.index("pip install")
    assert ci.index('PIP_CONSTRAINT="$PWD/.ci/constraints/oldest.txt"') < ci.index(".venv-oldest-torch/bin/pip install")


def test_a_pin_that_conflicts_with_pyproject_fails_the_refresh_in_one_line():
    """The deliberately broken constraint: pip's resolver report becomes one line naming the pin and
    the range it breaks, exit 1, and no constraint file is touched. (Resolved against this
    environment with no index: nothing is downloaded.)"""
    before = {p.name: p.read_text() for p in CONSTRAINTS.iterdir()}
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            ROOT / "scripts" / "refresh-constraints",
            "--python",
            sys.executable,
            "--pin",
            "pydantic==1.10.0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "refresh-constraints: newest: pip cannot resolve: conflicting requirements: pyproject.toml's "
        "pydantic<3 and >=2.6; the pin pydantic==1.10.0"
    ]
    assert {p.name: p.read_text() for p in CONSTRAINTS.iterdir()} == before
