"""The budget policy: hold a byte budget (a share of cloud-only bytes) with per-link forward rates."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from recserve.core.calibration import ForwardGain
from recserve.core.offload import Verdict
from recserve.policies.config import (
    SplitTargetConfig,
    explore_option,
    option,
    probe_seed_option,
    share,
    window_option,
)
from recserve.policies.controller import ControlledQuantile
from recserve.policies.quality import MIN_VERDICTS, UPDATE_EVERY, VERDICT_WINDOW
from recserve.policies.simple import (
    FamilyThresholds,
    format_family_thresholds,
    format_family_values,
    parse_family_thresholds,
    parse_family_values,
)
from recserve.policies.spending import ByteLedger, BytePrior, WindowMean, split_budget

# The links above the first forward at least this share: without a byte prior, the first tier needs some requests to
# cross every link to know what cloud-only serving costs, and these are the ones the tiers above doubt most.
MIN_RATE = 0.02
LINK_SPLITS = ("fill", "price")


def _fill_share(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be within (0, 1]"


def _fill_shares(values: FamilyThresholds) -> str | None:
    return None if all(0.0 < value <= 1.0 for _, value in values) else "must all be within (0, 1]"


FamilyPriors = tuple[tuple[str, BytePrior], ...]


def parse_family_priors(text: str) -> FamilyPriors:
    """ "mmlu=31:45:60:118,medmcqa=..." -> ((family, BytePrior), ...); raises ValueError saying what is wrong."""
    return parse_family_values(text, BytePrior.parse, "family byte priors", "mmlu=31:45:60:118,medmcqa=...")


def format_family_priors(priors: FamilyPriors) -> str:
    return format_family_values(priors, str)


def _split(value: str) -> str | None:
    return None if value in LINK_SPLITS else f"must be one of {', '.join(LINK_SPLITS)}"


def _shares(values: FamilyThresholds) -> str | None:
    return None if all(0.0 <= value <= 1.0 for _, value in values) else "must all be within [0, 1]"


@dataclass(frozen=True, kw_only=True)
class BudgetConfig(SplitTargetConfig):
    name = "budget"

    byte_budget: float = option(0.4, "bytes to spend, as a share of cloud-only serving", check=share)
    # An operator whose task families differ in what forwarding buys them (or in what they may cost) gives each its
    # own; families not named take `byte_budget`.
    family_budgets: tuple[tuple[str, float], ...] = option(
        (),
        "per-family byte budgets, e.g. mmlu=0.3,triviaqa=0.5",
        check=_shares,
        parse=parse_family_thresholds,
        text=format_family_thresholds,
    )
    fill_cap: float = option(0.85, "the most a tier below the last link forwards before links above", check=_fill_share)
    # Chosen on a labelled calibration set for the budget (`recserve eval` and the chain study tune them on the
    # train split: evaluation.splits.tune_family_fill_caps); families not named take `fill_cap`.
    family_fill_caps: tuple[tuple[str, float], ...] = option(
        (),
        "per-family fill caps chosen on a labelled calibration set, e.g. mmlu=0.6,medmcqa=0.45",
        check=_fill_shares,
        parse=parse_family_thresholds,
        text=format_family_thresholds,
        in_eval=False,
    )
    # Measured on the same calibration set (`recserve eval` and the chain study do it on the train split:
    # evaluation.splits.calibrate_family_byte_priors). With one, a family's first tier holds its bytes from the first
    # request, and the links above need not forward MIN_RATE to measure them.
    family_byte_priors: tuple[tuple[str, BytePrior], ...] = option(
        (),
        "per-family cloud-only byte priors measured on a calibration set: each tier's mean answer bytes, lowest "
        "first, then the framing's, e.g. mmlu=31:45:60:118",
        parse=parse_family_priors,
        text=format_family_priors,
        in_eval=False,
    )
    link_split: str = option(
        "fill",
        "how the budget is split between links: fill (fixed rates, the lower links first up to the fill cap) or "
        "price (learned from Feedback: a tier above the first forwards where its gain per byte beats the first "
        "tier's)",
        check=_split,
        text=str,
    )
    explore: float = explore_option()
    probe_seed: int = probe_seed_option()
    window: int = window_option()

    @property
    def learns_from_feedback(self) -> bool:
        return self.link_split == "price"  # the fill split needs no verdicts

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        for family, prior in self.family_byte_priors:
            if len(prior.answers) != self.links + 1:
                yield (
                    f"family_byte_priors gives {family!r} {len(prior.answers)} answer means; a chain of "
                    f"{self.links} links has {self.links + 1} tiers"
                )

    def build(self) -> BudgetPolicy:
        return BudgetPolicy(self)


@dataclass
class _FamilyBudget:
    controller: ControlledQuantile
    ledger: ByteLedger
    holding_bytes: bool = False  # whether the last decision left the controller to the measured bytes
    threshold: float | None = None  # the last decision's
    # The price split's: what forwarding is expected to gain, by confidence, from the verdicts.
    gain: ForwardGain = field(default_factory=lambda: ForwardGain(VERDICT_WINDOW, MIN_VERDICTS))
    # The first tier's: each forwarded request's bytes as a share of its estimated cloud-only bytes, and the price.
    forward_costs: WindowMean = field(default_factory=lambda: WindowMean(VERDICT_WINDOW))
    price: float | None = None
    learned_rate: float | None = None  # a tier above the first's: the share of its window worth the price
    since_update: int = 0

    @property
    def forward_cost(self) -> float:
        """The mean cost of a recent forwarded request, a share of its cloud-only bytes (kept off zero: it divides)."""
        return max(self.forward_costs.mean, 1e-3)


class BudgetPolicy:
    """Hold a byte budget (share of cloud-only bytes): each tier holds its link's forward rate per family, and
    the first tier, which sees the bytes of every link in its replies, holds the measured bytes.

    A tier knows its place in the chain from the confidences of the tiers below (`lower`, handed to both
    `decide` and `observe_cost`), so every tier takes the same settings. The default (fill) split needs no
    feedback: the rates are what the budget buys. The rates alone land a few points under the budget (requests
    answered below the last tier carry shorter replies than cloud-only ones), so once its replies give an estimate
    of cloud-only bytes (`ByteLedger`) the first tier's controller integrates the byte error instead of the rate
    error, and spends what the tiers above leave unspent. Once a few forwards were costed, its level starts from the
    rate that spends the budget at the measured cost of a forwarded request (a share of its cloud-only bytes) instead
    of the split's rate, and the integral corrects only what that misses: on a short stream it has no time to build
    the whole offset.

    With the price split (`link_split="price"`) the tiers above the first learn their rates from Feedback: the
    first tier prices bytes (the expected gain of forwarding the request at its threshold, P_up - P_own from
    online calibrations, per share of cloud-only bytes a forwarded request costs it) and writes the price into its
    hop; a tier above forwards the share of its window whose expected gain beats the price of the links it adds,
    probing a share `explore` of what it keeps. Measured on the chain study, it loses to fill caps chosen on a
    labelled set (docs/evaluation.md, "Every chain"), so the fill split is the default.
    """

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self._random = random.Random(config.probe_seed)
        self.rates = split_budget(config.byte_budget, config.links, config.fill_cap)
        self._budgets = dict(config.family_budgets)
        self._priors = dict(config.family_byte_priors)
        caps = dict(config.family_fill_caps)
        self._family_rates = {
            family: split_budget(self.budget_for(family), config.links, caps.get(family, config.fill_cap))
            for family in {*caps, *self._budgets}
        }
        self._families: dict[str, _FamilyBudget] = {}

    def budget_for(self, family: str) -> float:
        """The byte budget of `family`: its own when it has one, else the default."""
        return self._budgets.get(family, self.config.byte_budget)

    def rates_for(self, family: str) -> list[float]:
        """The per-link forward rates of `family`: the split of its budget at its fill cap (the defaults where it
        has none of its own)."""
        return self._family_rates.get(family, self.rates)

    def target_rate(self, depth: int, family: str | None = None) -> float:
        rates = self.rates if family is None else self.rates_for(family)
        if depth >= len(rates):
            return 0.0
        spending = self._spending_rate(family) if depth == 0 and family is not None else None
        if spending is not None:
            return spending
        floor = MIN_RATE if depth > 0 and family not in self._priors else 0.0
        return max(rates[depth], floor)

    def _spending_rate(self, family: str) -> float | None:
        """The first tier's forward rate that spends `family`'s budget at the measured cost of a forwarded request
        (a share of its cloud-only bytes, over the recent forwards); None until as many forwards were costed as the
        ledger needs requests for an estimate of its own."""
        state = self._families.get(family)
        if state is None or len(state.forward_costs) < state.ledger.min_samples:
            return None
        return min(1.0, self.budget_for(family) / state.forward_cost)

    def _family(self, family: str) -> _FamilyBudget:
        state = self._families.get(family)
        if state is None:
            ledger = ByteLedger(self.config.links, prior=self._priors.get(family))
            controller = ControlledQuantile(self.config.window, seed=f"{self.config.probe_seed}:{family}")
            state = _FamilyBudget(controller, ledger)
            self._families[family] = state
        return state

    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        state = self._family(family)
        depth = len(lower)
        state.holding_bytes = depth == 0 and not is_last and state.ledger.ready
        pricing = self.config.link_split == "price" and depth > 0 and not is_last and byte_price is not None
        learned = self._learned_rate(state, depth, byte_price) if pricing else None
        target = self.target_rate(depth, family) if learned is None else learned
        if pricing:
            # Keep some requests whatever the rate, so that this tier's own answers are measured too.
            target = min(target, 1.0 - self.config.explore)
        forward, state.threshold = state.controller.decide(confidence, target, hold_rate=not state.holding_bytes)
        probe_rate = None
        if pricing and not forward and self._random.random() < self.config.explore:
            # The gain of forwarding is measured where this tier keeps too, not only extrapolated to it (and
            # measured at all when the split's rate forwards next to nothing).
            forward, probe_rate = True, self.config.explore
        price = self._price(state) if depth == 0 and not is_last and self.config.link_split == "price" else None
        return Verdict(forward and not is_last, state.threshold, probe_rate, price)

    def _learned_rate(self, state: _FamilyBudget, depth: int, byte_price: float | None) -> float | None:
        """A tier above the first, under the price split: the share of its recent confidences whose expected gain
        from forwarding (P_up - P_own) beats the first tier's price of the bytes it costs; None (the split's rate)
        until it has its calibrations (or there is no price)."""
        if byte_price is None or not state.gain.calibrated:
            return None
        state.since_update -= 1
        if state.learned_rate is None or state.since_update <= 0:
            gain = state.gain.predict(state.controller.sorted_values())
            # Forwarding from here crosses the links above: about (links - depth) / links of cloud-only bytes.
            cost = (self.config.links - depth) / self.config.links
            state.learned_rate = max(MIN_RATE, float(np.mean(gain > byte_price * cost)))
            state.since_update = UPDATE_EVERY
        return state.learned_rate

    def _price(self, state: _FamilyBudget) -> float | None:
        """The first tier's price of bytes: the expected gain of forwarding the request at its threshold, per share
        of cloud-only bytes a forwarded request costs; None until it has its calibrations and costs."""
        if not state.gain.calibrated or not len(state.forward_costs) or state.threshold is None:
            return state.price
        state.since_update -= 1
        if state.price is None or state.since_update <= 0:
            gain = float(state.gain.predict([state.threshold])[0])
            state.price = max(0.0, gain) / state.forward_cost
            state.since_update = UPDATE_EVERY
        return state.price

    def holds_bytes(self, family: str) -> bool:
        """Whether this tier's last decision for `family` was held to measured bytes rather than a rate."""
        state = self._families.get(family)
        return state is not None and state.holding_bytes

    def observe_cost(
        self,
        family: str,
        *,
        size: int,
        spent: Sequence[int],
        lower: Sequence[float] = (),
        answer_sizes: Sequence[int] = (),
    ) -> None:
        if lower:
            return  # only the first tier sees the bytes of every link
        state = self._family(family)
        was_ready = state.ledger.ready
        booked = state.ledger.record(size, spent, answer_sizes)
        if booked is not None:
            reference, cost = booked
            if not was_ready:
                # Until now the controller held the rate, and its integral is the early requests' rate error; the
                # first booking brings in their byte error, which measures the same over- or underspend again.
                state.controller.clear_error()
            state.controller.correct(self.budget_for(family) * reference - cost)
        if spent and state.ledger.ready:
            state.forward_costs.add(sum(spent) / state.ledger.cloud_only_estimate(size, answer_sizes))

    def controller(self, family: str) -> ControlledQuantile:
        """The controller that holds `family`'s rate (at the first tier, its bytes once the ledger is ready)."""
        return self._family(family).controller

    def threshold(self, family: str) -> float | None:
        state = self._families.get(family)
        return None if state is None else state.threshold

    def forward_count(self, family: str) -> int:
        """Requests of `family` this tier has forwarded so far."""
        state = self._families.get(family)
        return 0 if state is None else state.controller.forwards

    def decision_count(self, family: str) -> int:
        """Requests of `family` this tier has decided on so far."""
        state = self._families.get(family)
        return 0 if state is None else state.controller.decisions

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        if self.config.link_split == "price":
            self._family(family).gain.observe(confidence, correct, answered_here=answered_here, probe_rate=probe_rate)
