"""Online calibration: P(right | confidence) from recent verdicts, by windowed Platt scaling with a prior."""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

# Recorded confidences of exactly 0 or 1 are not certainties; clipping keeps the fit from extrapolating them
# to ±∞ in logit space, where one two-parameter curve cannot follow them.
_EPSILON = 0.01


def logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    clipped = np.clip(np.asarray(p, dtype=np.float64), _EPSILON, 1.0 - _EPSILON)
    result: npt.NDArray[np.float64] = np.log(clipped / (1.0 - clipped))
    return result


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """1 / (1 + e^-z) without overflow for large |z|."""
    result: npt.NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))
    return result


def fit_platt(
    confidences: npt.ArrayLike,
    outcomes: npt.ArrayLike,
    prior: tuple[float, float] = (0.0, 1.0),
    strength: float = 1.0,
    steps: int = 50,
    weights: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """(a, b) of P(right | c) = sigmoid(a + b·logit c), fitted with `fit_logistic`; the prior (0, 1) means
    "the confidence is already calibrated"."""
    x = logit(confidences)
    a, b = fit_logistic(np.column_stack([np.ones_like(x), x]), outcomes, prior, strength, steps, weights)
    return float(a), float(b)


def fit_logistic(
    design: npt.ArrayLike,
    outcomes: npt.ArrayLike,
    prior: npt.ArrayLike | None = None,
    strength: float = 1.0,
    steps: int = 50,
    weights: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64]:
    """θ of P(right | x) = sigmoid(x·θ), by Newton's method on the log-likelihood plus a ridge penalty
    `strength`·|θ - prior|² / 2 (prior 0 when not given).

    The penalty keeps the fit defined with few or one-sided verdicts (all right, all wrong, one value).
    """
    features = np.asarray(design, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    centre = np.zeros(features.shape[1]) if prior is None else np.asarray(prior, dtype=np.float64)
    theta = centre.copy()
    for _ in range(steps):
        p = sigmoid(features @ theta)
        gradient = features.T @ (w * (p - y)) + strength * (theta - centre)
        hessian = features.T @ (features * (w * p * (1.0 - p))[:, None]) + strength * np.eye(theta.size)
        step = np.linalg.solve(hessian, gradient)
        # A trust region: plain Newton steps can overshoot and diverge on nearly separable verdicts.
        largest = float(np.abs(step).max())
        if largest > 1.0:
            step /= largest
        theta -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return theta


class WindowedCalibration:
    """P(right | confidence) from the last `window` (confidence, verdict) pairs, refitted every `refit_every`.

    Before any verdict it returns the prior (by default the confidence itself).
    """

    def __init__(
        self, window: int = 1000, refit_every: int = 20, prior: tuple[float, float] = (0.0, 1.0), strength: float = 1.0
    ) -> None:
        if window < 1 or refit_every < 1:
            raise ValueError("window and refit_every must be at least 1")
        self.window = window
        self.refit_every = refit_every
        self.prior = prior
        self.strength = strength
        self.params = prior
        self._pairs: deque[tuple[float, bool, float]] = deque(maxlen=window)
        self._since_fit = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, confidence: float, correct: bool, weight: float = 1.0) -> None:
        if math.isnan(confidence):
            raise ValueError("confidence is NaN")
        self._pairs.append((confidence, correct, weight))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

    def refit(self) -> None:
        self._since_fit = 0
        if self._pairs:
            confidences, outcomes, weights = zip(*self._pairs, strict=True)
            self.params = fit_platt(confidences, outcomes, self.prior, self.strength, weights=weights)

    def predict(self, confidences: npt.ArrayLike) -> npt.NDArray[np.float64]:
        a, b = self.params
        return sigmoid(a + b * logit(confidences))


class ForwardGain:
    """What forwarding a request at confidence c is expected to gain: P(the tiers above answer right | c) - P(this
    tier's answer is right | c), each calibrated from the tier's verdicts: its own answers', and those of the requests
    it forwarded, a probe weighted by the inverse of the rate it was sent at (it stands for the requests the tier
    keeps). Trusted once it has `min_verdicts` verdicts of each kind."""

    def __init__(self, window: int, min_verdicts: int) -> None:
        self.own = WindowedCalibration(window)
        self.upstream = WindowedCalibration(window)
        self.min_verdicts = min_verdicts

    @property
    def calibrated(self) -> bool:
        return len(self.own) >= self.min_verdicts and len(self.upstream) >= self.min_verdicts

    def observe(
        self, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        if answered_here:
            self.own.add(confidence, correct)
        else:
            self.upstream.add(confidence, correct, 1.0 / probe_rate if probe_rate else 1.0)

    def predict(self, confidences: npt.ArrayLike) -> npt.NDArray[np.float64]:
        gain: npt.NDArray[np.float64] = self.upstream.predict(confidences) - self.own.predict(confidences)
        return gain


class KeepRule(NamedTuple):
    """Keep every confidence above `threshold`, and a random `tie_share` of those equal to it."""

    threshold: float
    tie_share: float = 1.0


def keep_threshold(confidences: npt.ArrayLike, gain: npt.ArrayLike, allowed_loss: float) -> KeepRule:
    """The lowest threshold t such that keeping the confidences ≥ t loses at most `allowed_loss` accuracy
    (a share of all requests), where `gain[i]` is what forwarding request i would win (P_up - P_own).

    Keeping starts from the most confident request and stops before the cumulative loss exceeds the allowance;
    requests where forwarding wins nothing (gain ≤ 0) cost nothing to keep. Returns +inf when nothing can be
    kept, and the lowest confidence when everything can. Confidences tie (a small model is often certain: 1.0
    on half the requests), so the allowance can end inside a block of equal confidences: the rule then keeps a
    share of that block, the share whose loss the allowance still covers, instead of all of it or none, which
    would make the loss swing around twice the allowance.
    """
    values = np.asarray(confidences, dtype=np.float64)
    if values.size == 0:
        return KeepRule(math.inf)
    order = np.argsort(-values, kind="stable")
    ranked = values[order]
    costs = np.maximum(np.asarray(gain, dtype=np.float64)[order], 0.0) / values.size
    within = np.cumsum(costs) <= allowed_loss + 1e-12
    if not within[0]:
        return KeepRule(math.inf)
    # Keep the longest prefix (highest confidences first) whose loss stays within the allowance.
    last = int(np.argmin(within)) - 1 if not within.all() else values.size - 1
    threshold = float(ranked[last])
    at_threshold = costs[ranked == threshold].sum()
    left = allowed_loss - costs[ranked > threshold].sum()
    return KeepRule(threshold, 1.0 if at_threshold <= left else max(0.0, left / at_threshold))
