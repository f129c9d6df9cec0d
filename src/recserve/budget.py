"""Target-driven offloading: hold a byte budget or a quality target online, with a controlled windowed quantile."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

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

    def decide(self, confidence: float, target: float) -> tuple[bool, float]:
        """(forward, threshold) for `confidence` under a target forward rate; learns from the decision."""
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
        # Bounded so that a long stretch at an unreachable target cannot wind the level up for ever.
        self.integral = min(1.0, max(-1.0, self.integral + self.gain * (target - forward)))
        return forward, threshold

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


class BudgetPolicy:
    """Hold a byte budget (share of cloud-only bytes): each tier holds its link's forward rate per family.

    A tier knows its place in the chain from the confidences of the tiers below (`lower`), so every tier
    takes the same settings. Needs no feedback: the rates are what the budget buys.
    """

    def __init__(self, budget: float, *, links: int = 2, fill_cap: float = 0.85, window: int = 10_000) -> None:
        self.rates = split_budget(budget, links, fill_cap)
        self.budget = budget
        self.window = window
        ControlledQuantile(window)  # validates before any request arrives
        self._controllers: dict[str, ControlledQuantile] = {}
        self._depth = 0  # this tier's place in the chain, learned from the first request

    def target_rate(self, depth: int) -> float:
        return self.rates[depth] if depth < len(self.rates) else 0.0

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        controller = self._controllers.get(family)
        if controller is None:
            controller = self._controllers[family] = ControlledQuantile(self.window)
        self._depth = len(lower)
        forward, threshold = controller.decide(confidence, self.target_rate(self._depth))
        return Verdict(forward and not is_last, threshold)

    def threshold(self, family: str) -> float | None:
        controller = self._controllers.get(family)
        if controller is None or not len(controller):
            return None
        return controller.quantile(self.target_rate(self._depth) + controller.integral)

    def observe_verdict(self, family: str, confidence: float, correct: bool, *, answered_here: bool) -> None:
        return None


@dataclass
class _QualityState:
    window: ControlledQuantile  # recent confidences; its quantile gives the cold-start threshold
    own: WindowedCalibration  # P(this tier's answer is right | confidence), from its own answers' verdicts
    upstream: WindowedCalibration  # P(the tiers above answer right | confidence), from forwarded requests
    pending_probes: dict[float, int] = field(default_factory=dict)
    threshold: float | None = None  # the calibrated keep threshold, once both calibrations have data
    since_update: int = 0


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

    def _update(self, state: _QualityState) -> None:
        values = state.window.sorted_values()
        gain = state.upstream.predict(values) - state.own.predict(values)
        state.threshold = keep_threshold(values, gain, self.tier_gap)

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        state = self._state(family)
        cold_forward, cold_threshold = state.window.decide(confidence, 0.0 if is_last else self.cold_rate)
        if is_last:
            return Verdict(False, cold_threshold)
        if self.calibrated(family):
            state.since_update -= 1
            if state.threshold is None or state.since_update <= 0:
                # The threshold scan is O(W): redone every few requests, not on every one.
                self._update(state)
                state.since_update = self.update_every
            assert state.threshold is not None
            forward, threshold = self._calibrated_forward(state, confidence), state.threshold
        else:
            forward, threshold = cold_forward, cold_threshold
        probe = not forward and self._random.random() < self.explore
        if probe:
            state.pending_probes[confidence] = state.pending_probes.get(confidence, 0) + 1
        return Verdict(forward or probe, threshold)

    def _calibrated_forward(self, state: _QualityState, confidence: float) -> bool:
        assert state.threshold is not None
        return confidence < state.threshold

    def threshold(self, family: str) -> float | None:
        state = self._states.get(family)
        if state is None or not len(state.window):
            return None
        if state.threshold is not None:
            return state.threshold
        return state.window.quantile(self.cold_rate)

    def observe_verdict(self, family: str, confidence: float, correct: bool, *, answered_here: bool) -> None:
        state = self._state(family)
        if answered_here:
            state.own.add(confidence, correct)
            return
        state.upstream.add(confidence, correct)
        pending = state.pending_probes.get(confidence, 0)
        if pending == 1:
            del state.pending_probes[confidence]
        elif pending:
            state.pending_probes[confidence] = pending - 1
