"""A tier image started with TLS or mutual TLS turns `healthy` by its own HEALTHCHECK (`recserve health`, no
arguments): Docker runs the check inside the container, with only that container's variables and files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from recserve.tools.certs import make_certificates

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "recserve-device:latest"
LOCAL_BASE_IMAGE = "recserve-base:bookworm"


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.fail("no Docker daemon: run `make docker-ready` (root installs and starts it)")
    # A make started by pytest started by make must not inherit the outer make's job server and flags.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    run(["make", "--no-print-directory", f"BASE_IMAGE={LOCAL_BASE_IMAGE}", "images"], env=env, timeout=1800)
    return IMAGE


def readable_by_the_container(folder: Path) -> Path:
    """The image runs as uid 10001: the mounted test files must be readable by others (never do this with real
    keys)."""
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


@pytest.mark.parametrize("mutual", [False, True], ids=["TLS", "mTLS"])
def test_a_tier_container_serving_tls_becomes_healthy(
    image: str, mutual: bool, trace_folder: Path, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    make_certificates(certs)
    readable_by_the_container(certs)
    traces = readable_by_the_container(Path(shutil.copytree(trace_folder, tmp_path / "traces")))
    variables = {
        "RECSERVE_ENGINE": "replay", "RECSERVE_TRACES": "/traces", "RECSERVE_TRACE_MODEL": "small",
        "RECSERVE_TLS_CERT": "/certs/device.pem", "RECSERVE_TLS_KEY": "/certs/device.key",
    }  # fmt: skip
    if mutual:
        variables["RECSERVE_TLS_CLIENT_CA"] = "/certs/recserve-dev-ca.pem"
    name = f"recserve-tls-health-{os.getpid()}-{'mtls' if mutual else 'tls'}"
    run(["docker", "run", "-d", "--name", name, "--network", "none",
         "-v", f"{certs}:/certs:ro", "-v", f"{traces}:/traces:ro",
         *(arg for key, value in variables.items() for arg in ("-e", f"{key}={value}")), image])  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            health = json.loads(run(["docker", "inspect", "--format", "{{json .State.Health}}", name]))
            if health["Status"] == "healthy":
                break
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=False)
            assert health["Status"] != "unhealthy", f"{health['Log'][-1:]}\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
            assert time.monotonic() < deadline, f"not healthy after 120 s: {health}\n{logs.stderr[-2000:]}"
            time.sleep(1)
        assert "SERVING" in health["Log"][-1]["Output"]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
