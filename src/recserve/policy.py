"""Offload policies: given a tier's confidence, answer here or forward to the next tier."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from recserve.threshold import WindowedQuantile

POLICY_NAMES = ("recserve", "fixed", "forward-all", "local", "budget", "quality")


@dataclass(frozen=True)
class Verdict:
    forward: bool
    threshold: float
    # Set when the forward is a probe: a request the policy would have kept, forwarded at this rate to measure
    # the tiers above. The tier hands it back with the request's verdict (`observe_verdict`).
    probe_rate: float | None = None


class OffloadPolicy(Protocol):
    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        """Record `confidence` and say whether to forward; `is_last` tiers must never forward.

        `lower` holds the confidences of the tiers below, first tier first (what they saw before forwarding).
        """

    def threshold(self, family: str) -> float | None:
        """The current threshold for `family`, None while there is none."""

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        """Learn that the answer to a request this tier scored at `confidence` was right or wrong: its own
        answer (`answered_here`) or, for a request it forwarded, the answer of a tier above; `probe_rate` is
        the decision's `Verdict.probe_rate`."""

    def observe_cost(self, family: str, *, size: int, spent: Sequence[int]) -> None:
        """Learn what a request cost once it is served: `size` is its bytes as this tier received it, `spent`
        the bytes measured on each link from this tier up to the tier that answered (empty when this tier
        answered it, or when the next tier did not answer)."""


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


def make_policy(
    name: str,
    *,
    beta: float = 0.3,
    window: int = 10_000,
    threshold: float = 0.5,
    family_thresholds: Mapping[str, float] | None = None,
    byte_budget: float = 0.4,
    quality_gap: float = 0.02,
    links: int = 2,
    fill_cap: float = 0.85,
    explore: float = 0.05,
    cold_rate: float = 0.5,
    seed: int = 0,
) -> OffloadPolicy:
    if name in ("budget", "quality"):
        from recserve.budget import BudgetPolicy, QualityPolicy  # budget.py builds on this module

        if name == "budget":
            return BudgetPolicy(byte_budget, links=links, fill_cap=fill_cap, window=window)
        return QualityPolicy(quality_gap, links=links, window=window, explore=explore, cold_rate=cold_rate, seed=seed)
    if name == "recserve":
        return RecServePolicy(beta, window)
    if name == "fixed":
        return FixedThresholdPolicy(threshold, family_thresholds)
    if name == "forward-all":
        return ForwardAllPolicy()
    if name == "local":
        return LocalOnlyPolicy()
    raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
