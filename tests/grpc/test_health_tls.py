"""`recserve health` against tiers that serve TLS and mutual TLS on loopback: the right credentials give 0; a
missing client certificate, another CA or another name give 1 and one line that says why."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from recserve.cli import main
from recserve.server.app import RunningTier, start_tier
from recserve.server.health import pinned_name
from recserve.server.settings import TierSettings


@pytest.fixture(autouse=True)
def no_tier_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`recserve health` takes its defaults from RECSERVE_* variables: each test sets the ones it means."""
    for name in os.environ:
        if name.startswith("RECSERVE_"):
            monkeypatch.delenv(name)


@asynccontextmanager
async def tls_tier(certs: Path, trace_folder: Path, *, mutual: bool) -> AsyncIterator[RunningTier]:
    settings = TierSettings.with_defaults(
        tier="device", host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder), trace_model="small",
        tls_cert=str(certs / "device.pem"), tls_key=str(certs / "device.key"),
        tls_client_ca=str(certs / "recserve-dev-ca.pem") if mutual else "",
    )  # fmt: skip
    running = await start_tier(settings)
    try:
        yield running
    finally:
        await running.stop(grace=0)


async def health(*args: str) -> int:
    # The check is synchronous gRPC: run it off the event loop that serves the tier.
    return await asyncio.to_thread(main, ["health", *args])


async def health_process(*args: str) -> tuple[int, str]:
    """`recserve health` in a process of its own, so that everything it writes to stderr is seen."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "recserve", "health", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={k: v for k, v in os.environ.items() if not k.startswith("RECSERVE_")},
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


def assert_one_line(err: str, *parts: str) -> None:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith("recserve health: ")
    for part in parts:
        assert part in err


@pytest.mark.parametrize("mutual", [False, True], ids=["TLS", "mTLS"])
async def test_health_speaks_the_tls_its_tier_serves(
    certs: Path, trace_folder: Path, mutual: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    client = ["--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")] if mutual else []
    async with tls_tier(certs, trace_folder, mutual=mutual) as running:
        assert await health("--target", running.address, "--ca", str(certs / "recserve-dev-ca.pem"), *client) == 0
    assert f"{running.address}: SERVING" in capsys.readouterr().out


@pytest.mark.parametrize("mutual", [False, True], ids=["TLS", "mTLS"])
async def test_health_without_arguments_checks_the_tier_of_its_shell_with_that_tiers_variables(
    certs: Path, trace_folder: Path, mutual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_tier(certs, trace_folder, mutual=mutual) as running:
        # What the tier's own container has: its port and certificate, and under mTLS the CA of its callers.
        monkeypatch.setenv("RECSERVE_PORT", str(running.port))
        monkeypatch.setenv("RECSERVE_TLS_CERT", running.settings.tls_cert)
        monkeypatch.setenv("RECSERVE_TLS_KEY", running.settings.tls_key)
        if mutual:
            monkeypatch.setenv("RECSERVE_TLS_CLIENT_CA", running.settings.tls_client_ca)
        assert await health() == 0
        # A plaintext check of a TLS tier fails: TLS came from those variables.
        assert await health("--ca", "") == 1


async def test_an_mtls_tier_refuses_a_check_without_a_client_certificate_in_one_line(
    certs: Path, trace_folder: Path
) -> None:
    async with tls_tier(certs, trace_folder, mutual=True) as running:
        code, err = await health_process("--target", running.address, "--ca", str(certs / "recserve-dev-ca.pem"))
    assert code == 1
    assert_one_line(err, running.address, "no client certificate", "UNAVAILABLE")


async def test_a_check_trusting_another_ca_fails_in_one_line(certs: Path, trace_folder: Path) -> None:
    impostor = str(certs / "other" / "impostor-ca.pem")
    async with tls_tier(certs, trace_folder, mutual=False) as running:
        code, err = await health_process("--target", running.address, "--ca", impostor)
    assert code == 1
    assert_one_line(err, f"TLS trusting {impostor}", "UNAVAILABLE")


async def test_a_name_the_tiers_certificate_does_not_carry_fails(certs: Path, trace_folder: Path) -> None:
    async with tls_tier(certs, trace_folder, mutual=False) as running:
        code, err = await health_process(
            "--target", running.address, "--ca", str(certs / "device.pem"), "--server-name", "cloud.example"
        )
    assert code == 1
    assert_one_line(err, "expecting 'cloud.example'", "UNAVAILABLE")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ca", "missing-ca.pem"], "cannot read --ca missing-ca.pem: No such file or directory"),
        (["--ca", "missing-ca.pem", "--cert", "client.pem"], "--cert and --key go together"),
    ],
)
def test_unusable_tls_options_fail_before_connecting(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", *args]) == 1
    assert capsys.readouterr().err == f"recserve health: {message}\n"


def test_a_pinned_tier_certificate_names_the_identity_to_expect_and_a_ca_names_none(certs: Path) -> None:
    assert pinned_name((certs / "edge.pem").read_bytes()) == "edge"
    assert pinned_name((certs / "recserve-dev-ca.pem").read_bytes()) == ""
