"""Each image's HEALTHCHECK, exactly as its services/<tier>/Dockerfile writes it, passes against that image's
ENTRYPOINT serving with TLS or mutual TLS: both run as processes with the environment such a container has."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recserve.server.processes import free_port
from recserve.tools.certs import make_certificates
from tests.conftest import read_env_file

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).resolve().parents[2] / "services"
TIERS = sorted(path.parent.name for path in SERVICES.glob("*/Dockerfile"))


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    """The JSON (exec form) command of an instruction, e.g. `HEALTHCHECK ... CMD [...]` or `ENTRYPOINT [...]`."""
    text = dockerfile.read_text().replace("\\\n", " ")
    pattern = r"HEALTHCHECK\b.*?\bCMD" if instruction == "HEALTHCHECK" else instruction
    found = re.findall(rf"^{pattern}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert len(found) == 1, f"{dockerfile}: expected one {instruction} in exec form, found {found}"
    command: list[str] = json.loads(found[0])
    return command


def tls_container_environment(tier: str, certs: Path, traces: Path, *, mutual: bool) -> dict[str, str]:
    """A container of `tier` (its tier.env) set to TLS as the README says: its certificate instead of plaintext,
    the CA of its callers under mTLS, the CA of the next tier and its client certificate for that link."""
    ca, cert, key = str(certs / "recserve-dev-ca.pem"), str(certs / f"{tier}.pem"), str(certs / f"{tier}.key")
    env = {name: value for name, value in os.environ.items() if not name.startswith("RECSERVE_")}
    env |= read_env_file(SERVICES / tier / "tier.env")
    env |= {"RECSERVE_PLAINTEXT": "false", "RECSERVE_TLS_CERT": cert, "RECSERVE_TLS_KEY": key}
    if mutual:
        env["RECSERVE_TLS_CLIENT_CA"] = ca
    if env.get("RECSERVE_NEXT"):
        env |= {"RECSERVE_UPSTREAM_CA": ca, "RECSERVE_UPSTREAM_CERT": cert, "RECSERVE_UPSTREAM_KEY": key}
    # Where this machine differs from the container: a free loopback port, no metrics port, the replay engine
    # instead of the model volume, and `recserve` from this environment rather than the image's /opt/recserve.
    env |= {
        "RECSERVE_HOST": "127.0.0.1", "RECSERVE_PORT": str(free_port()), "RECSERVE_METRICS_PORT": "0",
        "RECSERVE_ENGINE": "replay", "RECSERVE_TRACES": str(traces), "RECSERVE_TRACE_MODEL": "small",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }  # fmt: skip
    return env


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, TIERS)
    return folder


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Tier processes started by a test, stopped with SIGTERM (as `docker stop` does) when it ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while b" ready on port " not in log.read_bytes():
        assert process.poll() is None, f"the tier exited with {process.returncode}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"the tier is not ready after {timeout:.0f}s:\n{log.read_text()[-2000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize("mutual", [False, True], ids=["TLS", "mTLS"])
@pytest.mark.parametrize("tier", TIERS)
def test_the_images_healthcheck_passes_against_its_tier_serving_tls(
    tier: str, mutual: bool, certs: Path, trace_folder: Path, tmp_path: Path, serving: list[subprocess.Popen[bytes]]
) -> None:
    dockerfile = SERVICES / tier / "Dockerfile"
    env = tls_container_environment(tier, certs, trace_folder, mutual=mutual)
    log = tmp_path / "tier.log"
    with log.open("wb") as output:
        serving.append(subprocess.Popen(exec_form(dockerfile, "ENTRYPOINT"), env=env, stdout=output, stderr=output))
    wait_ready(serving[-1], log)
    check = subprocess.run(exec_form(dockerfile, "HEALTHCHECK"), env=env, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert check.stdout == f"127.0.0.1:{env['RECSERVE_PORT']}: SERVING\n"
