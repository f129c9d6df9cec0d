"""How long a tier waits on the next one: a multiple of the next tier's recent latency, within bounds."""

from __future__ import annotations

import math
from collections import deque

# A call that has used this share of its timeout is slow: with the default factor, 1.5 times the recent p99.
SLOW_SHARE = 0.5


class ForwardTimeout:
    """`factor` times the `quantile` of the last `window` successful forward latencies, within [`floor`, `ceiling`].

    Until `min_samples` latencies are known the timeout is `ceiling`: a tier that has not yet seen its peer answer
    does not guess. A peer that turns slower raises its own timeout as its slow answers come in, up to `ceiling`;
    one that hangs gives no samples, so the timeout stays where the peer's healthy latency put it.
    """

    def __init__(
        self,
        *,
        ceiling: float = 30.0,
        floor: float = 1.0,
        factor: float = 3.0,
        quantile: float = 0.99,
        window: int = 200,
        min_samples: int = 20,
    ) -> None:
        if not 0 < floor <= ceiling or factor < 1 or not 0 < quantile <= 1 or not 1 <= min_samples <= window:
            raise ValueError(
                "forward timeout needs 0 < floor <= ceiling, factor >= 1, 0 < quantile <= 1 and "
                "1 <= min_samples <= window"
            )
        self.ceiling = ceiling
        self.floor = floor
        self._factor = factor
        self._quantile = quantile
        self._min_samples = min_samples
        self._latencies: deque[float] = deque(maxlen=window)
        self._seconds = ceiling

    @classmethod
    def unlimited(cls) -> ForwardTimeout:
        """No limit, for a next tier in the same process: it cannot hang, and an offline replay's answers must not
        depend on how busy the machine is (a stall past the floor would answer a request degraded, or not at all)."""
        return cls(ceiling=math.inf, floor=math.inf)

    @property
    def seconds(self) -> float:
        """The longest a forward may wait now."""
        return self._seconds

    @property
    def slow_after(self) -> float:
        """A forward still waiting after this many seconds is slow."""
        return self._seconds * SLOW_SHARE

    def observe(self, seconds: float) -> None:
        """A forward got its answer after `seconds`."""
        self._latencies.append(seconds)
        if len(self._latencies) < self._min_samples:
            return
        ordered = sorted(self._latencies)
        latency = ordered[max(0, math.ceil(self._quantile * len(ordered)) - 1)]
        self._seconds = min(self.ceiling, max(self.floor, self._factor * latency))
