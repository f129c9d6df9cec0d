"""The threshold policies: RecServe's windowed quantile, fixed thresholds (CasServe), forward-all, local."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from recserve.core.offload import OffloadPolicy, Verdict
from recserve.core.threshold import WindowedQuantile
from recserve.policies.config import PolicyConfig, a_number, option, share, window_option

FamilyThresholds = tuple[tuple[str, float], ...]


class _Stateless:
    """Policies that learn nothing from verdicts or costs."""

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        return None

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


@dataclass(frozen=True, kw_only=True)
class RecServeConfig(PolicyConfig):
    name = "recserve"

    beta: float = option(0.3, "forward below this quantile of recent confidences", check=share)
    window: int = window_option()

    def build(self) -> RecServePolicy:
        return RecServePolicy(self)


class RecServePolicy(_Stateless):
    """RecServe: forward iff confidence < the β-quantile of the family's last W confidences.

    The current confidence joins the window before the comparison, and nothing is forwarded until the
    window holds two values (a single value is its own quantile, so there is nothing to compare with).
    """

    def __init__(self, config: RecServeConfig) -> None:
        self.config = config
        self._windows: dict[str, WindowedQuantile] = {}

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        window = self._windows.get(family)
        if window is None:
            window = self._windows[family] = WindowedQuantile(self.config.beta, self.config.window)
        window.add(confidence)
        threshold = window.quantile()
        forward = not is_last and len(window) >= 2 and confidence < threshold
        return Verdict(forward, threshold)

    def threshold(self, family: str) -> float | None:
        window = self._windows.get(family)
        return window.quantile() if window else None


Value = TypeVar("Value")


def parse_family_values(
    text: str, parse_value: Callable[[str], Value], what: str, example: str
) -> tuple[tuple[str, Value], ...]:
    """ "mmlu=A,medmcqa=B" -> (("mmlu", parse_value("A")), ("medmcqa", parse_value("B"))); raises ValueError saying
    what is wrong, `what` the values' name and `example` a text they take (a value's own complaint included)."""
    values: dict[str, Value] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, sep, value = item.partition("=")
        family = family.strip()
        if not sep or not family:
            raise ValueError(f"{what} must look like '{example}', got {item!r}")
        try:
            parsed = parse_value(value.strip())
        except ValueError as error:
            raise ValueError(f"{what} must look like '{example}', got {item!r}: {error}") from None
        if family in values:
            raise ValueError(f"{what} give {family!r} twice")
        values[family] = parsed
    return tuple(values.items())


def format_family_values(values: Sequence[tuple[str, Value]], text: Callable[[Value], str] = repr) -> str:
    return ",".join(f"{family}={text(value)}" for family, value in values)


def parse_family_thresholds(text: str) -> FamilyThresholds:
    """ "mmlu=0.42,medmcqa=0.5" -> (("mmlu", 0.42), ("medmcqa", 0.5)); raises ValueError saying what is wrong."""
    return parse_family_values(text, float, "family thresholds", "mmlu=0.42,medmcqa=0.5")


def format_family_thresholds(thresholds: FamilyThresholds) -> str:
    return format_family_values(thresholds)


def _numbers(thresholds: FamilyThresholds) -> str | None:
    return "must all be numbers" if any(math.isnan(threshold) for _, threshold in thresholds) else None


@dataclass(frozen=True, kw_only=True)
class FixedConfig(PolicyConfig):
    name = "fixed"
    aliases = ("casserve",)

    # `recserve eval` sets both per tier (given or tuned on the train split), so it takes neither.
    threshold: float = option(0.5, "forward below this confidence", check=a_number, in_eval=False)
    family_thresholds: tuple[tuple[str, float], ...] = option(
        (),
        "per-family thresholds, e.g. mmlu=0.42,medmcqa=0.5",
        check=_numbers,
        parse=parse_family_thresholds,
        text=format_family_thresholds,
        in_eval=False,
    )

    def build(self) -> FixedThresholdPolicy:
        return FixedThresholdPolicy(self)


class FixedThresholdPolicy(_Stateless):
    """CasServe: hand-tuned thresholds, one per tier (optionally one per task family), whatever the traffic."""

    def __init__(self, config: FixedConfig) -> None:
        self._threshold = config.threshold
        self._per_family = dict(config.family_thresholds)

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        threshold = self._per_family.get(family, self._threshold)
        return Verdict(not is_last and confidence < threshold, threshold)

    def threshold(self, family: str) -> float | None:
        return self._per_family.get(family, self._threshold)


@dataclass(frozen=True, kw_only=True)
class ForwardAllConfig(PolicyConfig):
    name = "forward-all"
    aliases = ("cloud-only",)

    def build(self) -> OffloadPolicy:
        return ForwardAllPolicy()


class ForwardAllPolicy(_Stateless):
    """Cloud-only serving: every tier but the last forwards everything."""

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        return Verdict(not is_last, math.inf)

    def threshold(self, family: str) -> float | None:
        return math.inf


@dataclass(frozen=True, kw_only=True)
class LocalConfig(PolicyConfig):
    name = "local"
    aliases = ("device-only",)

    def build(self) -> OffloadPolicy:
        return LocalOnlyPolicy()


class LocalOnlyPolicy(_Stateless):
    """Never forward: each tier answers what reaches it."""

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        return Verdict(False, -math.inf)

    def threshold(self, family: str) -> float | None:
        return -math.inf
