"""The threshold policies: RecServe's windowed quantile, fixed thresholds (CasServe), forward-all, local."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from recserve.core.offload import Verdict
from recserve.core.threshold import WindowedQuantile


class _Stateless:
    """Policies that learn nothing from verdicts or costs."""

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        return None

    def observe_cost(self, family: str, *, size: int, spent: Sequence[int]) -> None:
        return None


class RecServePolicy(_Stateless):
    """RecServe: forward iff confidence < the β-quantile of the family's last W confidences.

    The current confidence joins the window before the comparison, and nothing is forwarded until the
    window holds two values (a single value is its own quantile, so there is nothing to compare with).
    """

    def __init__(self, beta: float = 0.3, window: int = 10_000) -> None:
        WindowedQuantile(beta, window)  # validates the parameters before any request arrives
        self.beta = beta
        self.window = window
        self._windows: dict[str, WindowedQuantile] = {}

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        window = self._windows.get(family)
        if window is None:
            window = self._windows[family] = WindowedQuantile(self.beta, self.window)
        window.add(confidence)
        threshold = window.quantile()
        forward = not is_last and len(window) >= 2 and confidence < threshold
        return Verdict(forward, threshold)

    def threshold(self, family: str) -> float | None:
        window = self._windows.get(family)
        return window.quantile() if window else None


class FixedThresholdPolicy(_Stateless):
    """CasServe: hand-tuned thresholds, one per tier (optionally one per task family), whatever the traffic."""

    def __init__(self, threshold: float, per_family: Mapping[str, float] | None = None) -> None:
        self._per_family = dict(per_family or {})
        if any(math.isnan(t) for t in (threshold, *self._per_family.values())):
            raise ValueError("threshold is NaN")
        self._threshold = threshold

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        threshold = self._per_family.get(family, self._threshold)
        return Verdict(not is_last and confidence < threshold, threshold)

    def threshold(self, family: str) -> float | None:
        return self._per_family.get(family, self._threshold)


def parse_family_thresholds(text: str) -> dict[str, float]:
    """ "mmlu=0.42,medmcqa=0.5" -> {"mmlu": 0.42, "medmcqa": 0.5}; raises ValueError saying what is wrong."""
    thresholds: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, sep, value = item.partition("=")
        try:
            thresholds[family.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not family.strip():
            raise ValueError(f"family thresholds must look like 'mmlu=0.42,medmcqa=0.5', got {item!r}")
    return thresholds


class ForwardAllPolicy(_Stateless):
    """Cloud-only serving: every tier but the last forwards everything."""

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        return Verdict(not is_last, math.inf)

    def threshold(self, family: str) -> float | None:
        return math.inf


class LocalOnlyPolicy(_Stateless):
    """Never forward: each tier answers what reaches it."""

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        return Verdict(False, -math.inf)

    def threshold(self, family: str) -> float | None:
        return -math.inf
