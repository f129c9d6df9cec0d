"""A windowed quantile whose level an integral controller moves to hold a forward rate."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedList

from recserve.core.threshold import interpolated_quantile


class ControlledQuantile:
    """A sliding window of confidences whose forwarding quantile an integral controller moves to hold a rate.

    The windowed quantile at level r forwards about a share r of a stationary stream; when confidences drift,
    or the window is still filling, the realised rate departs from r, and the integral term (the cumulative
    error, times `gain`) shifts the level until the cumulative forward rate is back on target.
    """

    def __init__(self, window: int, gain: float = 0.01) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.gain = gain
        self._arrivals: deque[float] = deque()
        self._sorted = SortedList()
        self.integral = 0.0
        self.decisions = 0
        self.forwards = 0

    def __len__(self) -> int:
        return len(self._arrivals)

    def decide(self, confidence: float, target: float, *, hold_rate: bool = True) -> tuple[bool, float]:
        """(forward, threshold) for `confidence` under a target forward rate; learns from the decision unless
        the caller holds something else (`hold_rate` False) and feeds its own errors to `correct`."""
        if math.isnan(confidence):
            raise ValueError("confidence is NaN")
        if len(self._arrivals) == self.window:
            self._sorted.remove(self._arrivals.popleft())
        self._arrivals.append(confidence)
        self._sorted.add(confidence)
        level = min(1.0, max(0.0, target + self.integral))
        if level >= 1.0:
            threshold, forward = math.inf, True
        elif level <= 0.0:
            threshold, forward = -math.inf, False
        else:
            threshold = interpolated_quantile(self._sorted, level)
            # Like RecServe, nothing is compared with a lone value; the controller makes up for it later.
            forward = len(self._arrivals) >= 2 and confidence < threshold
        self.decisions += 1
        self.forwards += forward
        if hold_rate:
            self.correct(target - forward)
        return forward, threshold

    def correct(self, error: float) -> None:
        """Integrate `error` (what the level should rise by, in shares of a request) into the level."""
        # Bounded so that a long stretch at an unreachable target cannot wind the level up for ever.
        self.integral = min(1.0, max(-1.0, self.integral + self.gain * error))

    def quantile(self, level: float) -> float:
        """The `level`-quantile of the window: +inf at 1 (forward all), -inf at 0 (forward none)."""
        if level >= 1.0:
            return math.inf
        if level <= 0.0 or not self._sorted:
            return -math.inf
        return interpolated_quantile(self._sorted, level)

    def sorted_values(self) -> npt.NDArray[np.float64]:
        return np.asarray(self._sorted, dtype=np.float64)

    @property
    def forward_rate(self) -> float:
        return self.forwards / self.decisions if self.decisions else 0.0
