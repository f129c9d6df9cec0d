"""Sliding-window quantile thresholds: numpy.percentile's linear method, updated in O(log W) per value."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedList


def interpolated_quantile(sorted_values: SortedList | list[float], q: float) -> float:
    """The q-quantile of already-sorted values, bit-for-bit as numpy's default 'linear' method computes it."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("quantile of an empty window")
    virtual_index = (n - 1) * q
    if virtual_index >= n - 1:
        return float(sorted_values[-1])
    below = math.floor(virtual_index)
    gamma = virtual_index - below
    a = float(sorted_values[below])
    b = float(sorted_values[below + 1])
    diff = b - a
    # numpy's _lerp interpolates from the nearer end, which changes the last bit of the result.
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


class SlidingWindow:
    """The last `window` values, the newest included, with their quantile at any level.

    A ring of arrival order plus a sorted list (a B+-tree-like structure) gives O(log W) insert,
    evict and rank look-up, where re-sorting or numpy.percentile per value costs O(W).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._arrivals: deque[float] = deque()
        self._sorted = SortedList()

    def __len__(self) -> int:
        return len(self._arrivals)

    def add(self, value: float) -> None:
        if math.isnan(value):
            raise ValueError("confidence is NaN")
        if len(self._arrivals) == self.window:
            self._sorted.remove(self._arrivals.popleft())
        self._arrivals.append(value)
        self._sorted.add(value)

    def quantile_at(self, level: float) -> float:
        """The `level`-quantile of the window, as numpy.quantile(window, level) computes it."""
        return interpolated_quantile(self._sorted, level)

    def threshold_at(self, rate: float) -> float:
        """The threshold that forwards a share `rate` of the window: its `rate`-quantile, +inf at 1 (forward
        all), -inf at 0 or while the window is empty (forward none)."""
        if rate >= 1.0:
            return math.inf
        if rate <= 0.0 or not self._sorted:
            return -math.inf
        return self.quantile_at(rate)

    def forward_at(self, confidence: float, rate: float) -> tuple[bool, float]:
        """(forward, threshold) for `confidence`, the value added last, at a forward rate `rate`."""
        threshold = self.threshold_at(rate)
        # Like RecServe, nothing is compared with a lone value (it is its own quantile).
        return rate >= 1.0 or (len(self) >= 2 and confidence < threshold), threshold

    def rank_span(self, value: float) -> tuple[int, int]:
        """(values of the window below `value`, values at or below it): the ranks `value` takes among its ties."""
        return self._sorted.bisect_left(value), self._sorted.bisect_right(value)

    def sorted_values(self) -> npt.NDArray[np.float64]:
        return np.asarray(self._sorted, dtype=np.float64)


class WindowedQuantile(SlidingWindow):
    """The β-quantile of the last `window` values, the newest included, bit-identical to
    `numpy.percentile(window, 100*β)`."""

    def __init__(self, beta: float, window: int) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be within [0, 1], got {beta}")
        super().__init__(window)
        self.beta = beta
        # numpy.percentile(w, 100*β) divides by 100 again; doing the same keeps results identical.
        self._q = (100.0 * beta) / 100.0

    def quantile(self) -> float:
        return self.quantile_at(self._q)
