"""The quality policy: lose at most a given accuracy gap against the tiers above, calibrated from Feedback."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recserve.core.calibration import WindowedCalibration, keep_threshold
from recserve.core.offload import Verdict
from recserve.policies.controller import ControlledQuantile


@dataclass
class _QualityState:
    window: ControlledQuantile  # recent confidences; its quantile gives the cold-start threshold
    own: WindowedCalibration  # P(this tier's answer is right | confidence), from its own answers' verdicts
    upstream: WindowedCalibration  # P(the tiers above answer right | confidence), from forwarded requests
    kept: deque[float | None]  # per recent decision: the confidence of a request kept here, None if forwarded
    own_outcomes: deque[bool]  # recent verdicts on the answers kept here
    probe_outcomes: deque[bool]  # recent verdicts of the tiers above on probes
    probes_sent: int = 0
    threshold: float | None = None  # the calibrated keep threshold, once both calibrations have data
    tie_keep: float = 1.0  # the share of requests exactly at the threshold to keep
    since_update: int = 0


# The first MIN_PROBES probes are sent at EARLY_PROBE_RATE, so that the curve of the tiers above
# is measured where this tier keeps before much allowance is spent; MIN_DIRECT verdicts of each kind make the
# direct (curve-free) estimate of the kept requests' loss usable.
MIN_PROBES = 30
EARLY_PROBE_RATE = 0.5
MIN_DIRECT = 10


class QualityPolicy:
    """Hold a quality target: lose at most `gap` accuracy (0.01 = 1 point) against the tiers above, per family.

    Each tier calibrates online, from Feedback verdicts on the requests it served, two curves over its own
    confidence: P(own answer right | c) from the answers it kept, and P(tiers above right | c) from the requests
    it forwarded — the latter also on *probes*, a seeded random share `explore` of the requests it would keep,
    forwarded anyway so that the upper curve is measured where this tier keeps too (not only extrapolated). The
    expected loss of keeping request i is max(0, P_up(c_i) - P_own(c_i)); over the window of recent confidences
    the tier keeps, from the most confident down, as many as its share of the gap (`gap` / `links`) allows, and
    forwards the rest. Before `min_verdicts` verdicts of each kind (cold start, or when Feedback never comes)
    it forwards the `cold_rate` quantile of its window, like RecServe at β = cold_rate.

    The allowance is held over the stream, not only request by request: the requests kept while the curves
    were still learning (or before, at the cold rate) are re-priced with the current curves, and what they lost
    beyond the share is taken back from the allowance of the requests to come (and what they saved, given to
    them), so the loss of the recent window converges to the share. Without this, early keeps, priced by
    curves fitted on a few verdicts, spend the allowance several times over. The re-priced loss is the larger
    of the curves' and a direct estimate (probes' accuracy minus kept answers', times the kept share), and
    each probe's verdict is weighted by the inverse of the rate it was sent at (`Verdict.probe_rate`, handed
    back with the verdict), so the upper curve fits where this tier keeps. Requests tied at the threshold are
    kept at random in the share the allowance leaves for them.
    """

    def __init__(
        self,
        gap: float,
        *,
        links: int = 2,
        window: int = 10_000,
        verdict_window: int = 1000,
        explore: float = 0.05,
        cold_rate: float = 0.5,
        min_verdicts: int = 30,
        update_every: int = 20,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= gap <= 1.0 or not 0.0 <= explore <= 1.0 or not 0.0 <= cold_rate <= 1.0:
            raise ValueError("gap, explore and cold_rate are shares within [0, 1]")
        ControlledQuantile(window)
        self.gap = gap
        self.tier_gap = gap / links  # each link's tier gets an equal share of the allowed loss
        self.window = window
        self.verdict_window = verdict_window
        self.explore = explore
        self.cold_rate = cold_rate
        self.min_verdicts = min_verdicts
        self.update_every = update_every
        self._random = random.Random(seed)
        self._states: dict[str, _QualityState] = {}

    def _state(self, family: str) -> _QualityState:
        state = self._states.get(family)
        if state is None:
            state = self._states[family] = _QualityState(
                ControlledQuantile(self.window, gain=0.0),
                WindowedCalibration(self.verdict_window),
                WindowedCalibration(self.verdict_window),
                deque(maxlen=self.window),
                deque(maxlen=self.verdict_window),
                deque(maxlen=self.verdict_window),
            )
        return state

    def calibrated(self, family: str) -> bool:
        state = self._state(family)
        return len(state.own) >= self.min_verdicts and len(state.upstream) >= self.min_verdicts

    def estimated_loss(self, family: str) -> float | None:
        """Expected accuracy lost by keeping what the current threshold keeps; None before calibration."""
        state = self._state(family)
        if state.threshold is None:
            return None
        values = state.window.sorted_values()
        gain = np.maximum(state.upstream.predict(values) - state.own.predict(values), 0.0)
        return float(gain[values >= state.threshold].sum() / max(values.size, 1))

    def kept_loss(self, family: str) -> float:
        """The estimated accuracy lost so far (a share of the recent decisions) on the requests kept here, priced
        with the current curves."""
        state = self._state(family)
        kept = np.array([c for c in state.kept if c is not None], dtype=np.float64)
        if not kept.size:
            return 0.0
        gain = np.maximum(state.upstream.predict(kept) - state.own.predict(kept), 0.0)
        curve = float(gain.sum() / len(state.kept))
        if len(state.probe_outcomes) < MIN_DIRECT or len(state.own_outcomes) < MIN_DIRECT:
            return curve
        # Probes are a random sample of what this tier keeps, so their verdicts against the kept answers' give
        # the loss without the curves' shape; a two-parameter curve misprices ties (many confidences of 1.0).
        lift = np.mean(state.probe_outcomes) - np.mean(state.own_outcomes)
        direct = kept.size / len(state.kept) * max(0.0, float(lift))
        return max(direct, curve)

    def _update(self, family: str, state: _QualityState) -> None:
        values = state.window.sorted_values()
        gain = state.upstream.predict(values) - state.own.predict(values)
        # Proportional to the cumulative error: the requests to come may lose the share plus what the recent
        # ones left unspent (or minus what they overspent).
        allowance = min(1.0, max(0.0, 2 * self.tier_gap - self.kept_loss(family)))
        state.threshold, state.tie_keep = keep_threshold(values, gain, allowance)

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        state = self._state(family)
        cold_forward, cold_threshold = state.window.decide(confidence, 0.0 if is_last else self.cold_rate)
        if is_last:
            return Verdict(False, cold_threshold)
        if self.calibrated(family):
            state.since_update -= 1
            if state.threshold is None or state.since_update <= 0:
                # The threshold scan is O(W): redone every few requests, not on every one.
                self._update(family, state)
                state.since_update = self.update_every
            assert state.threshold is not None
            forward, threshold = self._calibrated_forward(state, confidence), state.threshold
        else:
            forward, threshold = cold_forward, cold_threshold
        rate = self.explore if state.probes_sent >= MIN_PROBES else max(self.explore, EARLY_PROBE_RATE)
        probe = not forward and self._random.random() < rate
        state.probes_sent += probe
        state.kept.append(None if forward or probe else confidence)
        return Verdict(forward or probe, threshold, rate if probe else None)

    def _calibrated_forward(self, state: _QualityState, confidence: float) -> bool:
        assert state.threshold is not None
        if confidence == state.threshold:
            return self._random.random() >= state.tie_keep
        return confidence < state.threshold

    def threshold(self, family: str) -> float | None:
        state = self._states.get(family)
        if state is None or not len(state.window):
            return None
        if state.threshold is not None:
            return state.threshold
        return state.window.quantile(self.cold_rate)

    def observe_cost(self, family: str, *, size: int, spent: Sequence[int]) -> None:
        return None

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        state = self._state(family)
        if answered_here:
            state.own.add(confidence, correct)
            state.own_outcomes.append(correct)
            return
        weight = 1.0
        if probe_rate:
            weight = 1.0 / probe_rate  # inverse propensity: a probe stands for the requests kept
            state.probe_outcomes.append(correct)
        state.upstream.add(confidence, correct, weight)
