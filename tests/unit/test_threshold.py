"""The windowed quantile equals numpy.percentile over the same window, through eviction."""

from __future__ import annotations

import math
import random
from collections import deque

import numpy as np
import pytest

from recserve.core.threshold import SlidingWindow, WindowedQuantile, interpolated_quantile


@pytest.mark.parametrize("beta", [0.0, 0.05, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("window", [1, 2, 7, 100])
def test_matches_numpy_percentile_on_random_streams(beta: float, window: int) -> None:
    rng = random.Random(f"{beta}-{window}")
    tracker = WindowedQuantile(beta, window)
    reference: deque[float] = deque(maxlen=window)
    for _ in range(3 * window + 50):
        # Ties are common in practice (replayed confidences repeat), so draw some on purpose.
        value = rng.random() if rng.random() < 0.8 else rng.choice([0.25, 0.5, 0.75])
        tracker.add(value)
        reference.append(value)
        assert len(tracker) == len(reference)
        assert tracker.quantile() == np.percentile(np.array(reference), 100 * beta)


def test_matches_numpy_at_default_window_after_eviction() -> None:
    rng = np.random.default_rng(3)
    tracker = WindowedQuantile(0.3, 10_000)
    stream = rng.beta(2, 5, size=12_500)
    for value in stream:
        tracker.add(float(value))
    assert tracker.quantile() == np.percentile(stream[-10_000:], 100 * 0.3)


def test_interpolates_linearly_between_neighbours() -> None:
    assert interpolated_quantile([0.0, 1.0], 0.25) == 0.25
    assert interpolated_quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


@pytest.mark.parametrize(("beta", "window"), [(-0.1, 10), (1.5, 10), (0.3, 0)])
def test_rejects_bad_parameters(beta: float, window: int) -> None:
    with pytest.raises(ValueError, match=r"beta|window"):
        WindowedQuantile(beta, window)


def test_rejects_nan_and_empty_window() -> None:
    tracker = WindowedQuantile(0.3, 5)
    with pytest.raises(ValueError, match="empty"):
        tracker.quantile()
    with pytest.raises(ValueError, match="NaN"):
        tracker.add(float("nan"))


def test_quantile_at_any_level_matches_numpy_quantile_through_eviction() -> None:
    rng = random.Random(7)
    window = SlidingWindow(9)
    reference: deque[float] = deque(maxlen=9)
    for _ in range(40):
        value = rng.random()
        window.add(value)
        reference.append(value)
        for level in (0.0, 0.13, 0.5, 0.91, 1.0):
            assert window.quantile_at(level) == np.quantile(np.array(reference), level)
    assert list(window.sorted_values()) == sorted(reference)


def test_forward_at_a_rate_forwards_all_at_one_none_at_zero_and_never_on_a_lone_value() -> None:
    window = SlidingWindow(10)
    assert window.threshold_at(0.5) == -math.inf  # empty: nothing to forward below
    window.add(0.4)
    assert window.forward_at(0.4, 0.9) == (False, 0.4)  # a lone value is its own quantile
    assert window.forward_at(0.4, 1.0) == (True, math.inf)
    window.add(0.2)
    assert window.forward_at(0.2, 0.5) == (True, pytest.approx(0.3))
    assert window.forward_at(0.2, 0.0) == (False, -math.inf)
