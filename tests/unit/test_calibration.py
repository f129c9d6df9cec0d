"""Online calibration math: Platt fits, the windowed calibrator and the keep threshold under a loss allowance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recserve.core.calibration import WindowedCalibration, fit_platt, keep_threshold, logit, sigmoid


def test_platt_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.02, 0.98, 20_000)
    truth = sigmoid(-0.5 + 2.0 * logit(confidences))
    outcomes = rng.random(20_000) < truth
    a, b = fit_platt(confidences, outcomes, strength=0.0)
    assert a == pytest.approx(-0.5, abs=0.08)
    assert b == pytest.approx(2.0, abs=0.1)


def test_platt_fit_stays_finite_on_one_sided_verdicts_and_leans_on_the_prior() -> None:
    a, b = fit_platt([0.9, 0.95, 0.99], [True, True, True])
    assert math.isfinite(a)
    assert math.isfinite(b)
    assert 0.0 < a < 3.0  # more confident than the prior, not infinitely so
    assert b > 0.5
    assert fit_platt([0.5], [True], prior=(0.3, 1.0), strength=1e6) == pytest.approx((0.3, 1.0), abs=1e-5)


def test_sigmoid_does_not_overflow() -> None:
    assert sigmoid(np.array([-1e4, 0.0, 1e4])).tolist() == [0.0, 0.5, 1.0]


def test_windowed_calibration_starts_at_the_prior_and_follows_recent_verdicts() -> None:
    calibration = WindowedCalibration(window=200, refit_every=10)
    assert calibration.predict([0.2, 0.7]) == pytest.approx([0.2, 0.7])  # cold start: the confidence itself
    rng = np.random.default_rng(1)
    for confidence in rng.uniform(0.05, 0.95, 400):
        calibration.add(float(confidence), bool(rng.random() < 0.3))  # a tier right 30% of the time, whatever c
    assert len(calibration) == 200
    assert calibration.predict([0.1, 0.5, 0.9]) == pytest.approx([0.3, 0.3, 0.3], abs=0.1)


def test_keep_threshold_keeps_the_most_confident_within_the_allowance() -> None:
    confidences = [0.9, 0.8, 0.7, 0.6]
    gains = [0.0, 0.2, 0.2, 0.4]  # forwarding the most confident request wins nothing
    # Keeping 0.9 costs 0, 0.8 adds 0.2/4 = 0.05, 0.7 adds another 0.05, 0.6 adds 0.1.
    assert keep_threshold(confidences, gains, 0.0) == (0.9, 1.0)
    assert keep_threshold(confidences, gains, 0.05) == (0.8, 1.0)
    assert keep_threshold(confidences, gains, 0.1) == (0.7, 1.0)
    assert keep_threshold(confidences, gains, 1.0) == (0.6, 1.0)
    assert keep_threshold(confidences, [0.4, 0.4, 0.4, 0.4], 0.05).threshold == math.inf
    assert keep_threshold([], [], 0.1).threshold == math.inf


def test_keep_threshold_keeps_the_share_of_a_tie_the_allowance_covers() -> None:
    confidences = [1.0, 1.0, 1.0, 1.0, 0.5]
    gains = [0.1, 0.1, 0.1, 0.1, 0.0]  # each tied request costs 0.1/5 = 0.02 to keep
    assert keep_threshold(confidences, gains, 0.04) == pytest.approx((1.0, 0.5))
    assert keep_threshold(confidences, gains, 0.07) == pytest.approx((1.0, 0.875))
    assert keep_threshold(confidences, gains, 0.08) == (0.5, 1.0)


def test_a_weight_counts_like_repeated_verdicts() -> None:
    confidences = [0.2, 0.4, 0.6, 0.9, 0.9]
    outcomes = [0, 1, 0, 1, 1]
    repeated = fit_platt([*confidences, 0.9, 0.9], [*outcomes, 1, 1])
    weighted = fit_platt(confidences, outcomes, weights=[1, 1, 1, 2, 2])
    assert weighted == pytest.approx(repeated, abs=1e-6)
    assert fit_platt(confidences, outcomes) != pytest.approx(repeated, abs=1e-3)
