"""The quality policy: lose at most a given accuracy gap against the tiers above, calibrated from Feedback."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recserve.core.calibration import ForwardGain, keep_threshold
from recserve.core.offload import Verdict
from recserve.core.threshold import SlidingWindow
from recserve.policies.config import (
    SplitTargetConfig,
    explore_option,
    option,
    probe_seed_option,
    share,
    window_option,
)


@dataclass(frozen=True, kw_only=True)
class QualityConfig(SplitTargetConfig):
    name = "quality"

    quality_gap: float = option(0.02, "accuracy it may lose against the tiers above (0.02 = 2 points)", check=share)
    window: int = window_option()
    explore: float = explore_option()
    # Before verdicts a tier cannot know what keeping costs, so it keeps only its most confident tenth: at 0.5 the
    # first few hundred requests of a weak first tier lost up to 12 points. Chosen on the train split of the chain
    # study's first 16 chains (docs/chains.md), the lowest of 0.5, 0.8, 0.9 and 0.95 whose 500-request streams all
    # stayed within the gap plus 2 points at gaps of 0.02 and 0.05.
    cold_rate: float = option(0.9, "forward rate until verdicts arrive (and if they never do)", check=share)
    probe_seed: int = probe_seed_option()

    @property
    def learns_from_feedback(self) -> bool:
        return True

    def build(self) -> QualityPolicy:
        return QualityPolicy(self)


@dataclass
class _QualityState:
    window: SlidingWindow  # recent confidences; its quantile gives the cold-start threshold
    gain: ForwardGain  # P(tiers above right | confidence) - P(own answer right | confidence), from the verdicts
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
# The calibrations (and the direct estimate) learn from the last VERDICT_WINDOW verdicts of each kind, and are
# trusted from MIN_VERDICTS of each; the O(W) threshold scan is redone every UPDATE_EVERY requests.
VERDICT_WINDOW = 1000
MIN_VERDICTS = 30
UPDATE_EVERY = 20


class QualityPolicy:
    """Hold a quality target: lose at most `quality_gap` accuracy (0.01 = 1 point) against the tiers above, per
    family.

    Each tier calibrates online, from Feedback verdicts on the requests it served, two curves over its own
    confidence: P(own answer right | c) from the answers it kept, and P(tiers above right | c) from the requests
    it forwarded — the latter also on *probes*, a seeded random share `explore` of the requests it would keep,
    forwarded anyway so that the upper curve is measured where this tier keeps too (not only extrapolated). The
    expected loss of keeping request i is max(0, P_up(c_i) - P_own(c_i)); over the window of recent confidences
    the tier keeps, from the most confident down, as many as its share of the gap (`quality_gap` / `links`) allows,
    and forwards the rest. Before MIN_VERDICTS verdicts of each kind (cold start, or when Feedback never comes)
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

    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.tier_gap = config.quality_gap / config.links  # each link's tier gets an equal share of the allowed loss
        self._random = random.Random(config.probe_seed)
        self._states: dict[str, _QualityState] = {}

    def _state(self, family: str) -> _QualityState:
        state = self._states.get(family)
        if state is None:
            state = self._states[family] = _QualityState(
                SlidingWindow(self.config.window),
                ForwardGain(VERDICT_WINDOW, MIN_VERDICTS),
                deque(maxlen=self.config.window),
                deque(maxlen=VERDICT_WINDOW),
                deque(maxlen=VERDICT_WINDOW),
            )
        return state

    def calibrated(self, family: str) -> bool:
        state = self._states.get(family)
        return state is not None and state.gain.calibrated

    def estimated_loss(self, family: str) -> float | None:
        """Expected accuracy lost by keeping what the current threshold keeps; None before calibration."""
        state = self._states.get(family)
        if state is None or state.threshold is None:
            return None
        values = state.window.sorted_values()
        gain = np.maximum(state.gain.predict(values), 0.0)
        return float(gain[values >= state.threshold].sum() / max(values.size, 1))

    def kept_loss(self, family: str) -> float:
        """The estimated accuracy lost so far (a share of the recent decisions) on the requests kept here, priced
        with the current curves."""
        state = self._states.get(family)
        return 0.0 if state is None else _kept_loss(state)

    def _update(self, state: _QualityState) -> None:
        values = state.window.sorted_values()
        gain = state.gain.predict(values)
        # Proportional to the cumulative error: the requests to come may lose the share plus what the recent
        # ones left unspent (or minus what they overspent).
        allowance = min(1.0, max(0.0, 2 * self.tier_gap - _kept_loss(state)))
        state.threshold, state.tie_keep = keep_threshold(values, gain, allowance)

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        state = self._state(family)
        state.window.add(confidence)
        cold_forward, cold_threshold = state.window.forward_at(confidence, 0.0 if is_last else self.config.cold_rate)
        if is_last:
            return Verdict(False, cold_threshold)
        if state.gain.calibrated:
            state.since_update -= 1
            if state.threshold is None or state.since_update <= 0:
                self._update(state)
                state.since_update = UPDATE_EVERY
            assert state.threshold is not None
            forward, threshold = self._calibrated_forward(state, confidence), state.threshold
        else:
            forward, threshold = cold_forward, cold_threshold
        explore = self.config.explore
        rate = explore if state.probes_sent >= MIN_PROBES else max(explore, EARLY_PROBE_RATE)
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
        return state.window.threshold_at(self.config.cold_rate)

    def observe_cost(
        self,
        family: str,
        *,
        size: int,
        spent: Sequence[int],
        lower: Sequence[float] = (),
        answer_sizes: Sequence[int] = (),
    ) -> None:
        return None

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        state = self._state(family)
        state.gain.observe(confidence, correct, answered_here=answered_here, probe_rate=probe_rate)
        if answered_here:
            state.own_outcomes.append(correct)
        elif probe_rate:
            state.probe_outcomes.append(correct)


def _kept_loss(state: _QualityState) -> float:
    """`QualityPolicy.kept_loss` of one family's state."""
    kept = np.array([c for c in state.kept if c is not None], dtype=np.float64)
    if not kept.size:
        return 0.0
    gain = np.maximum(state.gain.predict(kept), 0.0)
    curve = float(gain.sum() / len(state.kept))
    if len(state.probe_outcomes) < MIN_DIRECT or len(state.own_outcomes) < MIN_DIRECT:
        return curve
    # Probes are a random sample of what this tier keeps, so their verdicts against the kept answers' give
    # the loss without the curves' shape; a two-parameter curve misprices ties (many confidences of 1.0).
    lift = np.mean(state.probe_outcomes) - np.mean(state.own_outcomes)
    direct = kept.size / len(state.kept) * max(0.0, float(lift))
    return max(direct, curve)
