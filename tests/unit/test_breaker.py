"""The circuit breaker opens on failures, probes after a cool-down, and backs off while the peer stays down."""

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
    breaker = CircuitBreaker(clock, failures=3, cooldown=2.0, max_cooldown=8.0)
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


def test_failed_probes_double_the_cooldown_up_to_the_maximum() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=1, cooldown=1.0, max_cooldown=3.0)
    breaker.record_failure()
    waits = []
    for _ in range(4):
        opened = clock.now
        while not breaker.allow():
            clock.now += 0.25
        waits.append(clock.now - opened)
        breaker.record_failure()
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(Clock(), failures=0)
