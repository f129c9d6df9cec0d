"""The circuit breaker opens on consecutive or frequent poor calls, probes after a cool-down that stays short, and
lets a probe that said nothing of the peer go to the next call."""

from __future__ import annotations

import pytest

from recserve.core.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_recovers_through_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=3, cooldown=2.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now = 2.0
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_a_peer_that_stays_away_is_probed_once_per_cooldown_without_backing_off() -> None:
    # A growing cool-down would leave a peer that came back unused for as long as it had been away.
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=1, cooldown=1.0)
    breaker.record_failure()
    waits = []
    for _ in range(4):
        opened = clock.now
        while not breaker.allow():
            clock.now += 0.25
        waits.append(clock.now - opened)
        breaker.record_failure()
    assert waits == [1.0, 1.0, 1.0, 1.0]


def test_a_frequent_share_of_poor_calls_opens_it_without_a_consecutive_run() -> None:
    breaker = CircuitBreaker(Clock(), failures=3, failure_rate=0.5, window=10)
    for _ in range(4):
        breaker.record_success()
        breaker.record_failure()
    assert breaker.closed  # 4 poor of 8: the window is not full yet
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN  # 5 poor of the last 10


def test_a_share_below_the_rate_keeps_it_closed() -> None:
    breaker = CircuitBreaker(Clock(), failures=3, failure_rate=0.5, window=10)
    for _ in range(20):
        breaker.record_success()
        breaker.record_success()
        breaker.record_failure()
    assert breaker.closed


def test_a_released_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=1, cooldown=1.0)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release_probe()  # e.g. the probe's caller had too short a deadline
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.closed


def test_late_failures_of_calls_sent_before_it_opened_do_not_extend_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=1, cooldown=1.0)
    breaker.record_failure()
    clock.now = 0.9
    breaker.record_failure()  # a call that went out before the breaker opened, reported late
    clock.now = 1.0
    assert breaker.allow()


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(Clock(), failures=0)
    with pytest.raises(ValueError, match="failure_rate"):
        CircuitBreaker(Clock(), failure_rate=0)
