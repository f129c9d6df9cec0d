"""Circuit breaker for the link to the next tier: stop waiting on a dead, hung or slow tier, probe it again later."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused at once until the cool-down ends
    HALF_OPEN = "half_open"  # one probe call is let through; its result decides


class CircuitBreaker:
    """Opens after `failures` consecutive poor calls, or when at least `failure_rate` of the last `window` calls
    were poor; after `cooldown` seconds lets one probe through, whose outcome closes or re-opens it.

    A poor call failed, or was slow: the caller reports a slow call as soon as it knows it to be slow, while it
    still waits, so a hung peer opens the breaker before its calls time out (Resilience4j's slow-call rate, and
    Envoy's consecutive gateway failures, which count timeouts). The consecutive rule reacts to a peer that went
    away; the rate rule to one that fails or stalls only part of the time.

    The cool-down stays the same while the peer stays away: it bounds how long a peer that came back goes unused,
    and a probe costs one request's wait (bounded by the probe's timeout), once per cool-down.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        failures: int = 3,
        cooldown: float = 1.0,
        failure_rate: float = 0.5,
        window: int = 20,
    ) -> None:
        if failures < 1 or cooldown <= 0 or not 0 < failure_rate <= 1 or window < 1:
            raise ValueError("breaker needs failures >= 1, cooldown > 0, 0 < failure_rate <= 1 and window >= 1")
        self._clock = clock
        self._threshold = failures
        self._cooldown = cooldown
        self._failure_rate = failure_rate
        self._recent: deque[bool] = deque(maxlen=window)  # True for a poor call, newest last
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def could_allow(self) -> bool:
        """Whether allow() would let a call out now, without taking the half-open probe."""
        if self.state is BreakerState.OPEN:
            return self._clock() - self._opened_at >= self._cooldown
        return self.state is BreakerState.CLOSED or not self._probing

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
        """A call got its answer in good time: the peer works."""
        if self.state is not BreakerState.CLOSED:
            self._recent.clear()  # a fresh start: what the peer did before it came back says nothing now
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False
        self._recent.append(False)

    def record_failure(self) -> None:
        """A call failed because of the peer, or has been slow: report each call once, when first known poor."""
        if self.state is BreakerState.OPEN:
            return  # a call that went out before the breaker opened: nothing new
        if self.state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        self._recent.append(True)
        poor_share = sum(self._recent) / len(self._recent)
        window_full = len(self._recent) == self._recent.maxlen
        if self._failures >= self._threshold or (window_full and poor_share >= self._failure_rate):
            self._open()

    def release_probe(self) -> None:
        """The probe ended without saying anything of the peer (the caller's own deadline or request was at fault):
        the next call may probe instead."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._recent.clear()
        self._probing = False
