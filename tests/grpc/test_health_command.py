"""`recserve health`, the containers' HEALTHCHECK, against a real tier on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recserve.cli import main
from recserve.server.app import start_tier
from recserve.server.processes import free_port
from recserve.server.settings import TierSettings


async def test_health_is_zero_while_serving_and_one_once_shutting_down(
    trace_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = TierSettings.with_defaults(
        tier="device",
        host="127.0.0.1",
        port=0,
        engine="replay",
        traces=str(trace_folder),
        trace_model="small",
        plaintext=True,
    )
    running = await start_tier(settings)
    target = ["--target", running.address]
    try:
        # The check is synchronous gRPC: run it off the event loop that serves the tier.
        assert await asyncio.to_thread(main, ["health", *target]) == 0
        assert f"{running.address}: SERVING" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["health", *target, "--service", "no.such.Service"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        await running.health.enter_graceful_shutdown()
        assert await asyncio.to_thread(main, ["health", *target]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
    finally:
        await running.stop(grace=0)


def test_health_of_nothing_listening_is_one_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No --target: the container's own RECSERVE_PORT on loopback.
    monkeypatch.setenv("RECSERVE_PORT", str(free_port()))
    assert main(["health", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
