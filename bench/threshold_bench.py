"""Threshold update cost at W = 10000: the project's tracker against numpy.percentile over the window per request.

RecServe's reference code recomputes the quantile of its confidence list for every request; that is the
baseline. Both run side by side on the same stream in one process, and must give identical thresholds.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import numpy as np

from recserve.core.threshold import WindowedQuantile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--beta", type=float, default=0.3)
    parser.add_argument("--requests", type=int, default=5_000, help="timed requests after the window is full")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    warm = [float(x) for x in rng.beta(2, 5, size=args.window)]
    stream = [float(x) for x in rng.beta(2, 5, size=args.requests)]

    tracker = WindowedQuantile(args.beta, args.window)
    reference: deque[float] = deque(maxlen=args.window)
    for value in warm:
        tracker.add(value)
        reference.append(value)

    tracked: list[float] = []
    started = time.perf_counter()
    for value in stream:
        tracker.add(value)
        tracked.append(tracker.quantile())
    tracker_seconds = time.perf_counter() - started

    recomputed: list[float] = []
    started = time.perf_counter()
    for value in stream:
        reference.append(value)
        recomputed.append(float(np.percentile(reference, 100 * args.beta)))
    numpy_seconds = time.perf_counter() - started

    # A kinder baseline: the window kept as a numpy ring buffer, so no list-to-array conversion per request.
    ring = np.array(warm)
    ring_recomputed: list[float] = []
    started = time.perf_counter()
    for position, value in enumerate(stream):
        ring[position % args.window] = value
        ring_recomputed.append(float(np.percentile(ring, 100 * args.beta)))
    ring_seconds = time.perf_counter() - started

    identical = tracked == recomputed == ring_recomputed
    per_tracker = tracker_seconds / args.requests * 1e6
    per_numpy = numpy_seconds / args.requests * 1e6
    print(f"window {args.window}, beta {args.beta}, {args.requests} requests after warm-up")
    print(f"  windowed tracker (sorted list): {per_tracker:8.2f} us per request")
    print(f"  numpy.percentile per request  : {per_numpy:8.2f} us per request")
    per_ring = ring_seconds / args.requests * 1e6
    print(f"  numpy.percentile, ring buffer : {per_ring:8.2f} us per request")
    print(
        f"  speed-up: {per_numpy / per_tracker:.0f}x over the reference (target >= 50x), "
        f"{per_ring / per_tracker:.0f}x over the ring buffer; identical thresholds: {identical}"
    )
    if not identical:
        raise SystemExit("thresholds differ")


if __name__ == "__main__":
    main()
