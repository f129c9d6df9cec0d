"""A windowed quantile whose level an integral controller moves to hold a forward rate."""

from __future__ import annotations

import random

from recserve.core.threshold import SlidingWindow


class ControlledQuantile(SlidingWindow):
    """A sliding window of confidences whose forwarding quantile an integral controller moves to hold a rate.

    At level r it forwards the newest of the n confidences in the window by its rank (the values below it): surely
    at a rank up to rn - 1, never at rn or above, and between them with the chance rn - rank (ties share their
    ranks, up to the planned rate: `forward_chance`). That forwards a share r of a stationary stream from the first
    request. The windowed quantile (RecServe's rule, `forward_at`) forwards the lowest of n values whenever
    0 < r(n - 1) < 1: a third of the requests when the window holds three, whatever r, until it holds 1/r + 1 (and
    none of a stream of equal values). A tier above that should forward a twentieth of what reaches it then sends on
    a large part of its first requests, across the dearest links, and the first tier, which prices its own forwards
    by what they cost, takes them to cost more than they do and underspends its budget. When confidences drift the
    realised rate still departs from r, and the integral term (the cumulative error, times `gain`) shifts the level
    until the cumulative forward rate is back on target.

    That term alone settles with the cumulative error at the offset it must supply (offset / gain requests' worth):
    when the target's level is not the one that meets it (rates standing in for bytes), the stream stays that
    much under target, a point or more of a family's bytes over a thousand requests. A second term, the integral
    of the first at gain²/4 (critical damping: no overshoot to undo), pays that error back within a few
    hundred requests.
    """

    # Chosen on the train split (docs/evaluation.md, "The controller's gain"): 0.01 left each family of the budget
    # policy undershooting its bytes by the end of a few hundred requests; 0.02-0.04 did better, faster ones jitter.
    def __init__(self, window: int, gain: float = 0.02, seed: int | str = 0) -> None:
        super().__init__(window)
        self.gain = gain
        self._random = random.Random(seed)  # the draws at the border: a replay decides as the live tier does
        self.integral = 0.0
        self.recovery = 0.0
        self.decisions = 0
        self.forwards = 0

    def decide(self, confidence: float, target: float, *, hold_rate: bool = True) -> tuple[bool, float]:
        """(forward, threshold) for `confidence` under a target forward rate; learns from the decision unless
        the caller holds something else (`hold_rate` False) and feeds its own errors to `correct`."""
        self.add(confidence)
        level = self.level(target)
        chance = self.forward_chance(confidence, level, planned=target)
        forward = chance >= 1.0 or (chance > 0.0 and self._random.random() < chance)
        self.decisions += 1
        self.forwards += forward
        if hold_rate:
            self.correct(target - forward)
        return forward, self.threshold_at(level)

    def forward_chance(self, confidence: float, level: float, planned: float) -> float:
        """The chance of forwarding `confidence`, the value added last, at `level`: the share of its ranks in the
        window (from the values below it to those at or below it) that lie under `level` times the window's length.

        A value tied with others is ranked at no more than the `planned` rate (the target, before the integral's
        correction). The correction forwards more or fewer of the requests the tier can rank; raising the share
        of a tie that it forwards buys bytes for requests no more doubtful than the ones it keeps. Where a
        stream's order brings a stretch in which the tie fills more of the window (a subject a model is sure of),
        the correction waits for the requests it can rank instead of spending on the tie."""
        below, through = self.rank_span(confidence)
        if through - below > 1:
            level = min(level, planned)
        return min(1.0, max(0.0, (level * len(self) - below) / (through - below)))

    def level(self, target: float) -> float:
        """The quantile level that forwards `target` once the integral's correction is added, within [0, 1]."""
        return min(1.0, max(0.0, target + self.integral + self.recovery))

    def clear_error(self) -> None:
        """Drop the error integrated so far (both terms), when the caller starts to hold another quantity."""
        self.integral = self.recovery = 0.0

    def correct(self, error: float) -> None:
        """Integrate `error` (what the level should rise by, in shares of a request) into the level."""
        # Bounded so that a long stretch at an unreachable target cannot wind the level up for ever.
        self.integral = min(1.0, max(-1.0, self.integral + self.gain * error))
        self.recovery = min(1.0, max(-1.0, self.recovery + self.gain / 4 * self.integral))

    @property
    def forward_rate(self) -> float:
        return self.forwards / self.decisions if self.decisions else 0.0
