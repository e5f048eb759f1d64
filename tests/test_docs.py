"""The README's commands are the ones CI runs, and the files it points to exist."""

from __future__ import annotations

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    block = re.search(r"## Set up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    """Pins the README's wording on purpose: CI runs its test command, so the two must not drift."""
    quickstart, tests = readme_commands()
    assert "recipes/quickstart.yaml" in quickstart
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f"{tests!r} is not a line of .ci/run"


def test_linked_docs_exist():
    for doc in re.findall(r"\((docs/[^)]+\.md)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / doc).is_file(), doc


def test_recipe_reference_covers_every_key():
    """Pins docs/recipes.md's key table to the schema on purpose: a new key needs its documentation."""
    from launcher.recipe.schema import Recipe

    text = (ROOT / "docs" / "recipes.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = getattr(field.annotation, "model_fields", None)
            inner = [a for a in getattr(field.annotation, "__args__", ()) if hasattr(a, "model_fields")]
            if sub is not None:
                yield from keys(field.annotation, f"{prefix}{name}.")
            elif inner and name not in ("early_stopping",):
                yield from keys(inner[0], f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [k for k in keys(Recipe) if f"`{k}`" not in text]
    assert not missing, f"docs/recipes.md does not document: {missing}"


def test_a_cpu_build_of_torch_installed_first_is_kept():
    """README: install torch's CPU wheels first, and `pip install -e .` keeps them. pip keeps an
    installed distribution that satisfies every requirement on it: the CPU builds' versions do."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # torch itself, and torchvision through the [vision] extra
    deps = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["vision"]]
    cpu_builds = {"torch": ["2.4.1+cpu", "2.14.1+cpu"], "torchvision": ["0.19.1+cpu", "0.29.1+cpu"]}
    for dep in deps:
        for version in cpu_builds.get(dep.name, []):
            assert dep.specifier.contains(version), f"{dep} would replace an installed torch {version}"
    assert {d.name for d in deps} >= set(cpu_builds)
    assert "download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()
