"""Placement policies: which next-tier candidate serves a forwarded request (after PerLLM, arXiv 2405.14636).

Implements `recserve.core.placement.Placement`. Pure: no gRPC, no clock (time comes in the outcomes), randomness
from a seed, so the live tiers and the discrete-event simulator (recserve.evaluation.placement_sim) drive the same
objects. Each is built from a frozen configuration (`PlacementConfig`) whose fields are also command-line options.

`CsUcbPlacement` is PerLLM's CS-UCB: an upper-confidence-bound bandit with a constraint-satisfaction step.
PerLLM's arms are (server, resource choice) pairs. Here an arm is a candidate alone: a tier does not allocate its
next tier's GPU share or batch slot (the next tier's engine schedules its own batch), so the resource dimension has
nothing to act on from this side; a candidate that offers two resource shapes can be listed as two candidates.

What PerLLM leaves open and what was chosen (docs/placement.md says more):

- Statistics are per candidate, pooled over service classes and request sizes, over a sliding window of the
  candidate's last `window` outcomes (sliding-window UCB).
- The time a candidate is expected to take for a request sent now is its window's mean plus `margin` spreads (a
  tail, so that most requests, not half, meet the requirement), scaled by this tier's load there: ((1 + requests in
  flight there now) / (1 + the mean of those in flight when its window's requests were sent)) ** `load_weight`
  (PerLLM's scheduler knows each server's queue; a tier knows only its own requests in flight, so a candidate whose
  answers stop coming back looks slower before the late answers arrive). The load is the one each request met when
  it was sent (`PlacementOutcome.load_at_send`), and the scaling goes both ways: the answers that come back after a
  burst waited in its queue, and a candidate idle now is not judged by them as if it were still loaded. The spread
  is the window's standard deviation shrunk toward the tier's pooled one (relative to the mean) as if two outcomes
  of that spread had been seen, and floored at a tenth of the mean: one fast answer does not make a candidate look
  certain.
- Constraint satisfaction: candidates whose expected time is within the request's requirement less `headroom` (a
  share kept in reserve: an energy-minimising choice otherwise rides the requirement's edge, where any lag in the
  statistics is a miss) are feasible; among them the one with the least optimistic energy wins (the window's mean
  - δ·spread·sqrt(ln t / n), the candidate's own energy spread, t the decisions so far, n its outcomes). None
  feasible: the least expected time. No requirement: the least optimistic energy among all. Only the loosest
  requests (none looser among the last `window` decisions) judge time optimistically too, δ·sqrt(ln t / n) spreads
  less: they can afford to find out that a candidate is faster than its window says, a tight one cannot.
- Energy is what the outcome reports (inference and transmission from the candidate up), weighed as PerLLM does,
  ω_infer·inference + ω_tran·transmission (`inference_weight`, `transmission_weight`). Idle energy is not a
  per-request quantity (servers draw it whether or not this request goes there), so the placement does not weigh
  it. The average per request, not the marginal: a request that joins a batch adds little, but choosing by that
  keeps a dear server's batch going (docs/placement.md: measured).
- A failure (the candidate failed or timed out) counts as a miss taking at least `failure_seconds`.
- Slowing down: with the margin above, one outcome far slower than the window moves the expected time past most
  requirements at once; should it not, `detect` outcomes in a row more than three spreads above the window's mean
  replace the window by those outcomes. A candidate that slows down abruptly thus loses its traffic within
  `detect` of its outcomes (and after at most `window` whatever the change's shape).
- Recovery: a usable candidate that costs less than the choice but has not been chosen in the last `probe`
  decisions is tried once (a probe), with one of the loosest requests; a probe faster than its stale window's mean
  restarts the window from the probe. A candidate that recovered therefore wins its traffic back within `probe`
  decisions (the next probe, while loose requests come), plus the outcomes in flight. A dearer candidate is never
  probed: it would not win whatever its time, and is tried again when the cheaper ones cannot meet a requirement.
- Untried usable candidates go first, in their order; one tried but not answered yet is left alone until its first
  answer. Ties go to the earlier candidate. The bandit is deterministic; the seed only serves `RandomPlacement`.
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from recserve.core.placement import Candidate, Placement, PlacementOutcome, PlacementRequest
from recserve.policies.config import OptionConfig, PolicyOption, at_least_one, not_negative, option, positive, share


@dataclass(frozen=True, kw_only=True)
class PlacementConfig(OptionConfig):
    """The configuration of one placement policy; subclasses are frozen dataclasses of `option` fields, named
    `placement_*` so that they never clash with an offload policy's options."""

    kind: ClassVar[str] = "placement"

    @abstractmethod
    def build(self) -> Placement:
        """A new placement object, with no state yet."""


def _usable(usable: Sequence[bool]) -> list[int]:
    indices = [index for index, ok in enumerate(usable) if ok]
    if not indices:
        raise ValueError("placement: no usable candidate")
    return indices


class _Unlearning:
    """Placements that learn nothing from outcomes and ignore load."""

    def observe(
        self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int, outcome: PlacementOutcome
    ) -> None:
        return None

    def in_flight(self, chosen: int, delta: int) -> None:
        return None


# --- the baselines --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FirstConfig(PlacementConfig):
    name = "first"

    def build(self) -> FirstPlacement:
        return FirstPlacement()


class FirstPlacement(_Unlearning):
    """The first usable candidate: the plain cascade (the next tier, or the next usable one)."""

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return _usable(usable)[0]


@dataclass(frozen=True, kw_only=True)
class RandomConfig(PlacementConfig):
    name = "random"

    placement_seed: int = option(0, "seed of the random placement")

    def build(self) -> RandomPlacement:
        return RandomPlacement(self.placement_seed)


class RandomPlacement(_Unlearning):
    """A usable candidate drawn uniformly, from a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed)

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return self._random.choice(_usable(usable))


@dataclass(frozen=True, kw_only=True)
class RoundRobinConfig(PlacementConfig):
    name = "round-robin"

    def build(self) -> RoundRobinPlacement:
        return RoundRobinPlacement()


class RoundRobinPlacement(_Unlearning):
    """The usable candidate after the one chosen last, in the candidates' order, wrapping around."""

    def __init__(self) -> None:
        self._last = -1

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        indices = _usable(usable)
        chosen = next((index for index in indices if index > self._last), indices[0])
        self._last = chosen
        return chosen


@dataclass(frozen=True, kw_only=True)
class LeastLoadedConfig(PlacementConfig):
    name = "least-loaded"

    def build(self) -> LeastLoadedPlacement:
        return LeastLoadedPlacement()


class LeastLoadedPlacement:
    """The usable candidate with the fewest of this tier's requests in flight (from `in_flight`); ties to the
    earlier candidate."""

    def __init__(self) -> None:
        self._in_flight: dict[int, int] = {}

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return min(_usable(usable), key=lambda index: (self._in_flight.get(index, 0), index))

    def observe(
        self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int, outcome: PlacementOutcome
    ) -> None:
        return None

    def in_flight(self, chosen: int, delta: int) -> None:
        self._in_flight[chosen] = max(self._in_flight.get(chosen, 0) + delta, 0)

    def load(self, chosen: int) -> int:
        return self._in_flight.get(chosen, 0)


@dataclass(frozen=True, kw_only=True)
class EdgeFirstConfig(PlacementConfig):
    name = "edge-first"

    def build(self) -> EdgeFirstPlacement:
        return EdgeFirstPlacement()


class EdgeFirstPlacement(_Unlearning):
    """The first usable candidate of the lowest level (the nearest tier): cloud only when no edge is usable."""

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return min(_usable(usable), key=lambda index: (candidates[index].level, index))


@dataclass(frozen=True, kw_only=True)
class CloudOnlyConfig(PlacementConfig):
    name = "cloud-only"

    def build(self) -> CloudOnlyPlacement:
        return CloudOnlyPlacement()


class CloudOnlyPlacement(_Unlearning):
    """The first usable candidate of the highest level (the farthest tier, the cloud)."""

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return min(_usable(usable), key=lambda index: (-candidates[index].level, index))


@dataclass(frozen=True, kw_only=True)
class PinnedConfig(PlacementConfig):
    name = "pinned"

    placement_pin: str = option("", "the candidate (by name) every forwarded request goes to while it is usable")

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if not self.placement_pin:
            yield "placement_pin must name one of the candidates (--placement-pin NAME)"

    def build(self) -> PinnedPlacement:
        return PinnedPlacement(self.placement_pin)


class PinnedPlacement(_Unlearning):
    """Always the named candidate; while it is unusable, the first usable one, as the plain cascade fails over. For
    an operator who keeps a tier's traffic on one site, and, in hindsight, the best single candidate: the reference a
    learning placement can at best match on a setup where one candidate is best for every request."""

    def __init__(self, pin: str) -> None:
        self.pin = pin

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        for index, candidate in enumerate(candidates):
            if candidate.name == self.pin:
                return index if usable[index] else _usable(usable)[0]
        names = ", ".join(candidate.name for candidate in candidates)
        raise ValueError(f"pinned placement: no candidate is named {self.pin!r}; the candidates are {names}")


# --- CS-UCB ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CsUcbConfig(PlacementConfig):
    name = "cs-ucb"

    placement_delta: float = option(
        0.5, "CS-UCB exploration: δ of the confidence bound δ·spread·sqrt(ln t / n)", check=not_negative
    )
    placement_window: int = option(16, "CS-UCB: outcomes kept per candidate (sliding window)", check=at_least_one)
    placement_margin: float = option(
        2.0, "CS-UCB: a candidate's expected time is its mean plus this many standard deviations", check=not_negative
    )
    placement_detect: int = option(
        3, "CS-UCB: this many outlying outcomes in a row restart a candidate's window", check=at_least_one
    )
    placement_probe: int = option(
        100,
        "CS-UCB: a usable candidate cheaper than the choice but not chosen in this many decisions is tried once",
        check=at_least_one,
    )
    placement_failure_seconds: float = option(
        60.0, "CS-UCB: the time a failed request counts as taking, at least", check=positive
    )
    placement_headroom: float = option(
        0.25, "CS-UCB: the share of a request's requirement kept in reserve when judging a candidate", check=share
    )
    placement_load_weight: float = option(
        1.0,
        "CS-UCB: scale a candidate's expected time by ((1 + in flight now) / (1 + in flight when its window's requests "
        "were sent)) to this power (0: ignore this tier's load)",
        check=not_negative,
    )
    placement_inference_weight: float = option(
        1.0, "CS-UCB: PerLLM's ω_infer, the weight of inference energy", check=not_negative
    )
    placement_transmission_weight: float = option(
        1.0, "CS-UCB: PerLLM's ω_tran, the weight of transmission energy", check=not_negative
    )

    def build(self) -> CsUcbPlacement:
        return CsUcbPlacement(self)


# How far (in spreads) an outcome must lie from its window's mean to count as a change, and the spread's floor
# relative to the mean (a window of equal times would otherwise call any difference a change).
_CHANGE_SPREADS = 3.0
_SPREAD_FLOOR = 0.1
# A candidate's time spread is its window's, shrunk toward the tier's pooled spread (relative to the mean) as if
# this many outcomes of that spread had been seen: one or two outcomes say little of a candidate's tail. Before two
# outcomes anywhere, the pooled relative spread is taken as 1 (service times as variable as an exponential's).
_PRIOR_OUTCOMES = 2.0
_PRIOR_RELATIVE_SPREAD = 1.0


class _Arm:
    """What CS-UCB knows of one candidate: its last outcomes (seconds, weighted joules, load) and the change
    detector's run."""

    def __init__(self, window: int) -> None:
        self.times: deque[float] = deque(maxlen=window)
        self.energies: deque[float] = deque(maxlen=window)
        self.loads: deque[int] = deque(maxlen=window)  # this tier's other requests in flight there at each send
        self.outliers: list[tuple[float, float, int]] = []  # the current run of outcomes far above the mean
        self.last_chosen = 0  # the decision that last chose it (0: never)
        self.probing = False  # chosen as a probe: its window is stale

    @property
    def n(self) -> int:
        return len(self.times)

    def time_mean(self) -> float:
        return sum(self.times) / len(self.times)

    def time_variance(self) -> float:
        mean = self.time_mean()
        return sum((time - mean) ** 2 for time in self.times) / len(self.times)

    def time_spread(self) -> float:
        """The window's standard deviation, floored at a tenth of its mean (for the change detector)."""
        return max(math.sqrt(self.time_variance()), _SPREAD_FLOOR * self.time_mean())

    def tail_spread(self, relative: float) -> float:
        """The spread of the expected time: the window's, shrunk toward `relative` times its mean by
        _PRIOR_OUTCOMES, floored at a tenth of the mean."""
        mean = self.time_mean()
        variance = (self.n * self.time_variance() + _PRIOR_OUTCOMES * (relative * mean) ** 2) / (
            self.n + _PRIOR_OUTCOMES
        )
        return max(math.sqrt(variance), _SPREAD_FLOOR * mean)

    def energy_mean(self) -> float:
        return sum(self.energies) / len(self.energies)

    def energy_spread(self) -> float:
        mean = self.energy_mean()
        variance = sum((energy - mean) ** 2 for energy in self.energies) / len(self.energies)
        return max(math.sqrt(variance), _SPREAD_FLOOR * mean)

    def load_mean(self) -> float:
        return sum(self.loads) / len(self.loads)

    def add(self, seconds: float, joules: float, load: int, detect: int) -> None:
        outcome = (seconds, joules, load)
        probing, self.probing = self.probing, False
        if self.times:
            mean, spread = self.time_mean(), self.time_spread()
            if probing and seconds < mean:  # a probe faster than its stale window: start again from the probe
                self.restart([outcome])
                return
            if seconds > mean + _CHANGE_SPREADS * spread:  # slower: one more in the run
                self.outliers.append(outcome)
                if len(self.outliers) >= detect:
                    self.restart(self.outliers)
                    return
            else:
                self.outliers = []
        self._append(outcome)

    def _append(self, outcome: tuple[float, float, int]) -> None:
        seconds, joules, load = outcome
        self.times.append(seconds)
        self.energies.append(joules)
        self.loads.append(load)

    def restart(self, outcomes: list[tuple[float, float, int]]) -> None:
        self.times.clear()
        self.energies.clear()
        self.loads.clear()
        for outcome in outcomes:
            self._append(outcome)
        self.outliers = []


class CsUcbPlacement:
    """PerLLM's CS-UCB over a tier's candidates (module docstring: what was chosen where PerLLM is silent)."""

    def __init__(self, config: CsUcbConfig | None = None) -> None:
        self.config = config or CsUcbConfig()
        self._arms: dict[str, _Arm] = {}
        self._decisions = 0
        self._in_flight: dict[int, int] = {}  # by candidate index, as `in_flight` reports it
        # The requirements of the last decisions (None: none), to tell the loosest requests, which probes ride on.
        self._requirements: deque[float] = deque(maxlen=self.config.placement_window)

    def _arm(self, candidate: Candidate) -> _Arm:
        arm = self._arms.get(candidate.name)
        if arm is None:
            arm = self._arms[candidate.name] = _Arm(self.config.placement_window)
        return arm

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        self._decisions += 1
        requirement = math.inf if request.requirement_seconds is None else request.requirement_seconds
        self._requirements.append(requirement)
        indices = _usable(usable)
        arms = {index: self._arm(candidates[index]) for index in indices}
        chosen = self._pick(request, arms, loosest=requirement >= max(self._requirements))
        arms[chosen].last_chosen = self._decisions
        return chosen

    def _pick(self, request: PlacementRequest, arms: dict[int, _Arm], loosest: bool) -> int:
        for index, arm in arms.items():
            if arm.last_chosen == 0 and arm.n == 0:
                return index
        # Tried but not answered yet: nothing to judge it by, and no reason to send it more before its first answer.
        known = {index: arm for index, arm in arms.items() if arm.n}
        if not known:
            return min(arms, key=lambda index: (self._in_flight.get(index, 0), index))
        arms = known
        relative = self._pooled_relative_spread()
        log_t = math.log(max(self._decisions, 2))
        # Optimism about time only for the loosest requests, which can afford a miss: a tight one goes by the
        # expected time alone.
        optimism = self.config.placement_delta * math.sqrt(log_t) if loosest else 0.0
        times = {index: self.expected_seconds(index, arm, relative, optimism) for index, arm in arms.items()}
        costs = {index: arm.energy_mean() for index, arm in arms.items()}
        energies = {
            index: costs[index] - self.config.placement_delta * arm.energy_spread() * math.sqrt(log_t / arm.n)
            for index, arm in arms.items()
        }
        requirement = request.requirement_seconds
        if requirement is None:
            chosen = min(arms, key=lambda index: (energies[index], index))
        else:
            limit = requirement * (1.0 - self.config.placement_headroom)
            feasible = [index for index in arms if times[index] <= limit]
            if feasible:
                chosen = min(feasible, key=lambda index: (energies[index], times[index], index))
            else:
                chosen = min(arms, key=lambda index: (times[index], index))
        if not loosest:
            return chosen
        # A probe: a candidate that would cost less than the choice but has not been chosen for `probe` decisions
        # (its window says it is too slow, and may be stale), tried with one of the loosest requests. A dearer one is
        # never probed: it would not be chosen whatever its time.
        stale = [
            index
            for index, arm in arms.items()
            if index != chosen
            and self._decisions - arm.last_chosen > self.config.placement_probe
            and costs[index] < costs[chosen]
        ]
        if not stale:
            return chosen
        probe = min(stale, key=lambda index: (arms[index].last_chosen, index))
        arms[probe].probing = True
        return probe

    def expected_seconds(self, index: int, arm: _Arm, relative: float | None = None, optimism: float = 0.0) -> float:
        """The time candidate `index` is expected to take for a request sent now: its window's mean plus `margin`
        spreads (shrunk toward `relative`, the tier's pooled spread relative to the mean) less `optimism` / sqrt(n)
        spreads, scaled by this tier's requests in flight there now against those its window's requests met."""
        if relative is None:
            relative = self._pooled_relative_spread()
        spreads = self.config.placement_margin - optimism / math.sqrt(arm.n)
        tail = max(arm.time_mean() + spreads * arm.tail_spread(relative), 0.0)
        load = (1 + self._in_flight.get(index, 0)) / (1 + arm.load_mean())
        return tail * math.pow(load, self.config.placement_load_weight)

    def _pooled_relative_spread(self) -> float:
        variance = square = 0.0
        for arm in self._arms.values():
            if arm.n >= 2:
                variance += arm.n * arm.time_variance()
                square += arm.n * arm.time_mean() ** 2
        return math.sqrt(variance / square) if square > 0 else _PRIOR_RELATIVE_SPREAD

    def observe(
        self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int, outcome: PlacementOutcome
    ) -> None:
        seconds = outcome.seconds
        if outcome.failed:
            seconds = max(seconds, self.config.placement_failure_seconds)
        # The load it met: this tier's other requests in flight there when it was sent; if the caller does not say,
        # those in flight now (assuming the outcome comes before the request's in_flight(-1)).
        load = outcome.load_at_send
        if load is None:
            load = max(self._in_flight.get(chosen, 0) - 1, 0)
        total = max(outcome.energy_joules, 0.0)
        transmission = min(max(outcome.transmission_joules, 0.0), total)
        energy = (
            self.config.placement_inference_weight * (total - transmission)
            + self.config.placement_transmission_weight * transmission
        )
        self._arm(candidates[chosen]).add(seconds, energy, load, self.config.placement_detect)

    def in_flight(self, chosen: int, delta: int) -> None:
        self._in_flight[chosen] = max(self._in_flight.get(chosen, 0) + delta, 0)

    def estimate(self, candidate: Candidate) -> tuple[float, float] | None:
        """The candidate's mean time (seconds) and weighted energy (joules) over its window, or None before an
        outcome."""
        arm = self._arms.get(candidate.name)
        return (arm.time_mean(), arm.energy_mean()) if arm and arm.n else None


# --- the registry ---------------------------------------------------------------------------------------------

PLACEMENT_CONFIGS: tuple[type[PlacementConfig], ...] = (
    CsUcbConfig,
    RandomConfig,
    RoundRobinConfig,
    LeastLoadedConfig,
    EdgeFirstConfig,
    CloudOnlyConfig,
    PinnedConfig,
    FirstConfig,
)
PLACEMENT_NAMES = tuple(config.name for config in PLACEMENT_CONFIGS)
DEFAULT_PLACEMENT = FirstConfig.name  # today's behaviour: the first usable candidate


def placement_config_type(name: str) -> type[PlacementConfig]:
    for config in PLACEMENT_CONFIGS:
        if name == config.name:
            return config
    raise ValueError(f"unknown placement {name!r}; choose one of: {', '.join(PLACEMENT_NAMES)}")


def placement_config(name: str, values: Mapping[str, Any] | None = None) -> PlacementConfig:
    """The configuration of placement `name` from the values of its options in `values`, defaults for the rest."""
    return placement_config_type(name).from_values(values or {})


def placement_options() -> tuple[PolicyOption, ...]:
    """Every placement option once, its help prefixed by the placements that take it."""
    options: dict[str, PolicyOption] = {}
    takers: dict[str, list[str]] = {}
    for config in PLACEMENT_CONFIGS:
        for spec in config.options():
            if options.setdefault(spec.name, spec) != spec:
                raise TypeError(f"the {config.name} placement's {spec.name} differs from another placement's")
            takers.setdefault(spec.name, []).append(config.name)
    return tuple(
        PolicyOption(
            spec.name,
            spec.default,
            f"{', '.join(takers[name])} placement: {spec.help}",
            spec.parse,
            spec.text,
            spec.check,
            spec.in_eval,
        )
        for name, spec in options.items()
    )
