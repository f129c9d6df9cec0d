"""Faults under load: a tier killed and restarted, or hung and let go on, mid-load, and many concurrent clients;
nothing is lost."""

from __future__ import annotations

import signal

import pytest

from recserve.tools.load import chaos, hang, load

pytestmark = [pytest.mark.integration, pytest.mark.processes]


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["edge killed", "edge stopped gracefully"])
def test_edge_down_mid_load_every_request_is_answered_and_forwarding_resumes(kill: int) -> None:
    result = chaos(clients=16, phase=4.0, kill=kill)
    report = result.load
    assert report.sent > 100
    assert report.lost == 0
    assert not report.errors, report.summary()
    assert report.answered == report.sent
    # While the edge was down, the device answered itself, marked degraded.
    down = [degraded for at, _, degraded in report.timeline if result.killed_at + 0.5 < at < result.restarting_at]
    assert down
    assert all(down)
    assert result.recovered_after is not None, report.summary()


def test_a_hung_edge_leaves_the_device_answering_and_forwarding_resumes_within_2s() -> None:
    result = hang(clients=32, phase=4.0)
    assert result.load.sent > 100
    assert all(result.goals.values()), result.summary()
    assert result.hung[0] > 0.95, result.summary()  # the device answers nearly everything itself while it hangs


def test_two_hundred_concurrent_clients_lose_nothing_with_bounded_memory() -> None:
    report = load(clients=200, seconds=8.0)
    assert report.lost == 0
    assert not report.errors, report.summary()
    assert report.answered == report.sent > 200
    assert set(report.peak_rss_bytes) == {"device", "edge", "cloud"}
    assert max(report.peak_rss_bytes.values()) < 600 * 2**20, report.summary()
