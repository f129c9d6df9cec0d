"""Sliding-window quantile threshold: numpy.percentile's linear method, updated in O(log W) per value."""

from __future__ import annotations

import math
from collections import deque

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


class WindowedQuantile:
    """The β-quantile of the last `window` values, the newest included.

    A ring of arrival order plus a sorted list (a B+-tree-like structure) gives O(log W) insert,
    evict and rank look-up, where re-sorting or numpy.percentile per value costs O(W).
    """

    def __init__(self, beta: float, window: int) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be within [0, 1], got {beta}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.beta = beta
        self.window = window
        # numpy.percentile(w, 100*β) divides by 100 again; doing the same keeps results identical.
        self._q = (100.0 * beta) / 100.0
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

    def quantile(self) -> float:
        return interpolated_quantile(self._sorted, self._q)
