"""Circuit breaker for the link to the next tier: stop waiting on a dead tier, probe it again later."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused at once until the cool-down ends
    HALF_OPEN = "half_open"  # one probe call is let through; its result decides


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown` seconds lets one probe through.

    A failed probe opens it again with the cool-down doubled (up to `max_cooldown`), so a tier that
    stays down costs one probe per cool-down, not one timeout per request.
    """

    def __init__(
        self, clock: Callable[[], float], *, failures: int = 3, cooldown: float = 2.0, max_cooldown: float = 30.0
    ) -> None:
        if failures < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("breaker needs failures >= 1 and 0 < cooldown <= max_cooldown")
        self._clock = clock
        self._threshold = failures
        self._base_cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._cooldown = cooldown
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state only one probe is in flight at a time."""
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = self._base_cooldown
        self._probing = False

    def record_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self._max_cooldown)
            self._open()
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._probing = False
