"""Target-driven offloading: hold a byte budget or a quality target online, with a controlled windowed quantile."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedList

from recserve.calibration import WindowedCalibration, keep_threshold
from recserve.policy import Verdict
from recserve.threshold import interpolated_quantile


def split_budget(budget: float, links: int = 2, fill_cap: float = 0.85) -> list[float]:
    """Per-link forward rates (each conditional on reaching that tier) that spend `budget` of cloud-only bytes.

    Every link is taken to carry about the same bytes per request (each hop sends the prompt up and the answer
    down), so a request that crosses k links costs k/links of cloud-only. Lower links are filled first, up to
    `fill_cap` (the rest stays on the cheapest tier that answers it confidently): on the recorded traces the best
    fixed thresholds in hindsight spend the budget that way (forward most of what the device doubts to the edge
    before sending anything on to the cloud).
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"the byte budget is a share of cloud-only bytes within [0, 1], got {budget}")
    if links < 1 or not 0.0 < fill_cap <= 1.0:
        raise ValueError("links must be at least 1 and fill_cap within (0, 1]")
    remaining = budget * links  # in units of "one link crossed by every request"
    reach = 1.0  # share of requests arriving at the current tier
    rates: list[float] = []
    for index in range(links):
        cap = 1.0 if index == links - 1 else fill_cap
        rate = min(cap, remaining / reach) if reach > 0 else 0.0
        rates.append(rate)
        reach *= rate
        remaining -= reach
    if remaining > 1e-9:
        # The caps leave budget over (budget > fill_cap): forward everything past the first tier, and buy the
        # rest with the first link's rate; continuous with the capped split at budget = fill_cap.
        rates = [budget] + [1.0] * (links - 1)
    return rates


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


class ByteLedger:
    """A first tier's estimate of what cloud-only serving would spend on its requests, from measured replies.

    Every link carries the request up (its size, plus the hops below) and a reply down whose size depends on
    the answers rather than on the prompt, so cloud-only bytes are taken as `links` times size plus an overhead:
    the mean, over the last `window` requests that crossed every link, of what they took beyond `links` times size
    (their bytes are exactly what cloud-only serving spends on them). Until `min_samples` such requests have
    come back there is no estimate.
    """

    def __init__(self, links: int, window: int = 1000, min_samples: int = 5, outlier_factor: float = 4.0) -> None:
        if links < 1 or window < 1 or min_samples < 1:
            raise ValueError("links, window and min_samples must be at least 1")
        self.links = links
        self.min_samples = min_samples
        self.outlier_factor = outlier_factor
        self._overheads: deque[int] = deque(maxlen=window)
        self._sorted = SortedList()
        self._pending: list[tuple[int, int]] = []  # (size, bytes taken) of requests not yet booked
        self._overhead_total = 0
        self._requests = 0
        self._reference_total = 0.0

    @property
    def ready(self) -> bool:
        return len(self._overheads) >= self.min_samples

    def cloud_only_estimate(self, size: int) -> float:
        return self.links * size + self._overhead_total / max(len(self._overheads), 1)

    def record(self, size: int, spent: Sequence[int]) -> list[tuple[float, float]]:
        """Book one served request, and return what can now be booked: (estimated cloud-only bytes, bytes taken)
        per request, in units of the mean estimate so far (so errors weigh alike whatever the message sizes).
        Requests served before there is an estimate are kept and returned together once there is one."""
        if len(spent) == self.links:
            if len(self._overheads) == self._overheads.maxlen:
                self._overhead_total -= self._overheads[0]
                self._sorted.remove(self._overheads[0])
            overhead = sum(spent) - self.links * size
            if self._sorted:
                # A rare giant reply (a model rambling on) would otherwise inflate every later estimate: the
                # requests that cross every link are the ones most doubted, where such replies concentrate.
                overhead = min(overhead, self.outlier_factor * max(self._sorted[len(self._sorted) // 2], 1))
            self._overheads.append(overhead)
            self._sorted.add(overhead)
            self._overhead_total += overhead
        self._pending.append((size, sum(spent)))
        if not self.ready:
            return []
        booked = []
        for pending_size, cost in self._pending:
            reference = self.cloud_only_estimate(pending_size)
            self._requests += 1
            self._reference_total += reference
            mean = self._reference_total / self._requests
            booked.append((reference / mean, cost / mean))
        self._pending.clear()
        return booked


@dataclass
class _FamilyBudget:
    controller: ControlledQuantile
    ledger: ByteLedger
    holding_bytes: bool = False  # whether the last decision left the controller to the measured bytes


class BudgetPolicy:
    """Hold a byte budget (share of cloud-only bytes): each tier holds its link's forward rate per family, and
    the first tier, which sees the bytes of every link in its replies, holds the measured bytes.

    A tier knows its place in the chain from the confidences of the tiers below (`lower`), so every tier
    takes the same settings. Needs no feedback: the rates are what the budget buys. The rates alone land a few
    points under the budget (requests answered below the last tier carry shorter replies than cloud-only
    ones), so once its replies give an estimate of cloud-only bytes (`ByteLedger`) the first tier's controller
    integrates the byte error instead of the rate error, and spends what the tiers above leave unspent.
    """

    def __init__(
        self,
        budget: float,
        *,
        links: int = 2,
        fill_cap: float = 0.85,
        window: int = 10_000,
        min_rate: float = 0.02,
    ) -> None:
        if not 0.0 <= min_rate <= 1.0:
            raise ValueError(f"min_rate is a share of requests within [0, 1], got {min_rate}")
        self.rates = split_budget(budget, links, fill_cap)
        self.budget = budget
        self.links = links
        self.window = window
        self.min_rate = min_rate
        ControlledQuantile(window)  # validates before any request arrives
        self._families: dict[str, _FamilyBudget] = {}
        self._depth = 0  # this tier's place in the chain, learned from the first request

    def target_rate(self, depth: int) -> float:
        if depth >= len(self.rates):
            return 0.0
        # The links above the first forward at least `min_rate`: the first tier needs some requests to cross
        # every link to know what cloud-only serving costs, and these are the ones the tiers above doubt most.
        return max(self.rates[depth], self.min_rate) if depth > 0 else self.rates[depth]

    def _family(self, family: str) -> _FamilyBudget:
        state = self._families.get(family)
        if state is None:
            state = self._families[family] = _FamilyBudget(ControlledQuantile(self.window), ByteLedger(self.links))
        return state

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        state = self._family(family)
        self._depth = len(lower)
        state.holding_bytes = self._depth == 0 and not is_last and state.ledger.ready
        target = self.target_rate(self._depth)
        forward, threshold = state.controller.decide(confidence, target, hold_rate=not state.holding_bytes)
        return Verdict(forward and not is_last, threshold)

    def holds_bytes(self, family: str) -> bool:
        """Whether this tier's last decision for `family` was held to measured bytes rather than a rate."""
        state = self._families.get(family)
        return state is not None and state.holding_bytes

    def observe_cost(self, family: str, *, size: int, spent: Sequence[int]) -> None:
        state = self._family(family)
        if self._depth > 0:
            return
        for reference, cost in state.ledger.record(size, spent):
            state.controller.correct(self.budget * reference - cost)

    def threshold(self, family: str) -> float | None:
        state = self._families.get(family)
        if state is None or not len(state.controller):
            return None
        return state.controller.quantile(self.target_rate(self._depth) + state.controller.integral)

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        return None


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
