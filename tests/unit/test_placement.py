"""Placement policies: CS-UCB (PerLLM) on synthetic servers, the baselines, the configuration registry."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from recserve.core.placement import Candidate, Placement, PlacementOutcome, PlacementRequest
from recserve.policies import PLACEMENT_NAMES, placement_config, placement_options
from recserve.policies.placement import (
    CloudOnlyPlacement,
    CsUcbConfig,
    CsUcbPlacement,
    EdgeFirstPlacement,
    FirstPlacement,
    LeastLoadedPlacement,
    RandomPlacement,
    RoundRobinPlacement,
)

EDGE = Candidate("edge", level=1)
CLOUD = Candidate("cloud", level=2)
TWO = (EDGE, CLOUD)
REQUEST = PlacementRequest(family="mmlu", requirement_seconds=2.0, service_class="interactive")

# A server: the seconds and joules one request takes there (a function of the request number, for slow-downs).
Server = Callable[[int], tuple[float, float]]


def steady(seconds: float, joules: float, rng: random.Random) -> Server:
    return lambda step: (seconds * rng.uniform(0.9, 1.1), joules * rng.uniform(0.9, 1.1))


def drive(
    placement: Placement,
    servers: dict[str, Server],
    steps: int,
    candidates: tuple[Candidate, ...] = TWO,
    request: PlacementRequest = REQUEST,
) -> list[str]:
    """Requests one after another (each answered before the next): the names chosen, in order."""
    chosen_names = []
    for step in range(steps):
        chosen = placement.choose(request, candidates, [True] * len(candidates))
        seconds, joules = servers[candidates[chosen].name](step)
        met = request.requirement_seconds is None or seconds <= request.requirement_seconds
        placement.observe(request, candidates, chosen, PlacementOutcome(seconds, joules, met))
        chosen_names.append(candidates[chosen].name)
    return chosen_names


def test_cs_ucb_picks_the_server_that_meets_the_requirement_though_it_costs_more() -> None:
    rng = random.Random(1)
    servers = {"edge": steady(3.5, 50.0, rng), "cloud": steady(1.0, 200.0, rng)}  # edge cheap but too slow
    chosen = drive(CsUcbPlacement(), servers, 300)
    assert Counter(chosen[-200:])["cloud"] >= 190


def test_cs_ucb_picks_the_cheaper_server_when_both_meet_the_requirement() -> None:
    rng = random.Random(2)
    servers = {"edge": steady(1.2, 50.0, rng), "cloud": steady(0.8, 200.0, rng)}
    chosen = drive(CsUcbPlacement(), servers, 300)
    assert Counter(chosen[-200:])["edge"] >= 190


def test_cs_ucb_without_a_requirement_picks_the_least_energy() -> None:
    rng = random.Random(3)
    servers = {"edge": steady(9.0, 50.0, rng), "cloud": steady(0.8, 200.0, rng)}
    request = PlacementRequest(family="mmlu")
    chosen = drive(CsUcbPlacement(), servers, 300, request=request)
    assert Counter(chosen[-200:])["edge"] >= 190


def test_cs_ucb_picks_the_fastest_when_none_is_feasible() -> None:
    rng = random.Random(4)
    servers = {"edge": steady(6.0, 50.0, rng), "cloud": steady(4.0, 200.0, rng)}  # both miss 2 s
    chosen = drive(CsUcbPlacement(), servers, 300)
    assert Counter(chosen[-200:])["cloud"] >= 190


def test_cs_ucb_tries_untried_usable_candidates_first_in_order() -> None:
    placement = CsUcbPlacement()
    three = (EDGE, Candidate("edge-b"), CLOUD)
    assert placement.choose(REQUEST, three, [True, True, True]) == 0
    placement.observe(REQUEST, three, 0, PlacementOutcome(0.5, 1.0, True))
    assert placement.choose(REQUEST, three, [True, False, True]) == 2  # edge-b untried but not usable
    placement.observe(REQUEST, three, 2, PlacementOutcome(0.5, 1.0, True))
    assert placement.choose(REQUEST, three, [True, True, True]) == 1


def test_cs_ucb_moves_off_a_server_that_slows_down_within_detect_outcomes_and_back_after_it_recovers() -> None:
    rng = random.Random(5)
    config = CsUcbConfig(placement_detect=3, placement_probe=50)

    def edge(step: int) -> tuple[float, float]:  # cheap and fast enough, but slow from 200 to 400
        return (4.0 if 200 <= step < 400 else 1.0) * rng.uniform(0.9, 1.1), 50.0 * rng.uniform(0.9, 1.1)

    servers = {"edge": edge, "cloud": steady(0.8, 200.0, rng)}
    chosen = drive(CsUcbPlacement(config), servers, 700)
    assert Counter(chosen[100:200])["edge"] >= 95
    # Slowed down: off the edge within `detect` of its slow outcomes (one far-off outcome is enough at margin 2).
    assert Counter(chosen[200:205])["edge"] <= config.placement_detect + 1
    assert Counter(chosen[205:400])["edge"] <= 195 // config.placement_probe + 2  # probes only
    # Recovered: back on the edge within `probe` decisions (the first probe after 400), and staying.
    back = next(step for step in range(400, 700) if chosen[step] == "edge")
    assert back <= 400 + config.placement_probe + 1
    assert Counter(chosen[back + 5 : back + 105])["edge"] >= 95


def test_cs_ucb_moves_off_a_candidate_whose_answers_stop_coming_back() -> None:
    rng = random.Random(6)
    placement = CsUcbPlacement()
    drive(placement, {"edge": steady(1.0, 50.0, rng), "cloud": steady(0.8, 200.0, rng)}, 50)
    assert placement.choose(REQUEST, TWO, [True, True]) == 0
    for _ in range(3):  # sent to the edge, no answer yet: its expected time grows with this tier's load there
        placement.in_flight(0, +1)
    assert placement.choose(REQUEST, TWO, [True, True]) == 1
    for _ in range(3):
        placement.in_flight(0, -1)
    assert placement.choose(REQUEST, TWO, [True, True]) == 0


def test_cs_ucb_counts_a_failure_as_a_long_miss() -> None:
    placement = CsUcbPlacement(CsUcbConfig(placement_failure_seconds=30.0))
    placement.observe(REQUEST, TWO, 0, PlacementOutcome(0.1, 0.0, False, failed=True))
    placement.observe(REQUEST, TWO, 1, PlacementOutcome(1.0, 200.0, True))
    assert placement.estimate(EDGE) == (30.0, 0.0)
    assert placement.choose(REQUEST, TWO, [True, True]) == 1


def test_cs_ucb_is_deterministic() -> None:
    def run() -> list[str]:
        rng = random.Random(7)
        servers = {"edge": steady(1.9, 50.0, rng), "cloud": steady(1.5, 80.0, rng)}
        return drive(CsUcbPlacement(), servers, 200)

    assert run() == run()


def test_random_is_seeded_and_uses_only_usable_candidates() -> None:
    three = (EDGE, Candidate("edge-b"), CLOUD)

    def run(seed: int) -> list[int]:
        placement = RandomPlacement(seed)
        return [placement.choose(REQUEST, three, [True, False, True]) for _ in range(100)]

    assert run(1) == run(1) != run(2)
    assert set(run(1)) == {0, 2}


def test_round_robin_cycles_over_usable_candidates() -> None:
    placement = RoundRobinPlacement()
    three = (EDGE, Candidate("edge-b"), CLOUD)
    picks = [placement.choose(REQUEST, three, [True, True, True]) for _ in range(4)]
    assert picks == [0, 1, 2, 0]
    assert placement.choose(REQUEST, three, [True, False, True]) == 2
    assert placement.choose(REQUEST, three, [True, False, True]) == 0


def test_least_loaded_picks_the_fewest_in_flight() -> None:
    placement = LeastLoadedPlacement()
    assert placement.choose(REQUEST, TWO, [True, True]) == 0
    placement.in_flight(0, +1)
    assert placement.choose(REQUEST, TWO, [True, True]) == 1
    placement.in_flight(1, +1)
    placement.in_flight(1, +1)
    assert placement.choose(REQUEST, TWO, [True, True]) == 0
    placement.in_flight(0, -1)
    assert placement.load(0) == 0
    assert placement.choose(REQUEST, TWO, [False, True]) == 1


def test_edge_first_cloud_only_and_first() -> None:
    candidates = (CLOUD, Candidate("edge-a"), Candidate("edge-b"), Candidate("cloud-b", level=2))
    assert EdgeFirstPlacement().choose(REQUEST, candidates, [True] * 4) == 1
    assert EdgeFirstPlacement().choose(REQUEST, candidates, [True, False, True, True]) == 2
    assert EdgeFirstPlacement().choose(REQUEST, candidates, [True, False, False, True]) == 0
    assert CloudOnlyPlacement().choose(REQUEST, candidates, [True] * 4) == 0
    assert CloudOnlyPlacement().choose(REQUEST, candidates, [False, True, True, True]) == 3
    assert CloudOnlyPlacement().choose(REQUEST, candidates, [False, True, True, False]) == 1
    assert FirstPlacement().choose(REQUEST, candidates, [True] * 4) == 0
    assert FirstPlacement().choose(REQUEST, candidates, [False, False, True, True]) == 2


def test_no_usable_candidate_is_an_error() -> None:
    with pytest.raises(ValueError, match="no usable"):
        FirstPlacement().choose(REQUEST, TWO, [False, False])


def test_registry_builds_each_placement_from_its_options() -> None:
    assert PLACEMENT_NAMES == ("cs-ucb", "random", "round-robin", "least-loaded", "edge-first", "cloud-only", "first")
    for name in PLACEMENT_NAMES:
        config = placement_config(name, {"placement_seed": 3, "placement_delta": 0.5, "beta": 0.2})
        placement = config.build()
        assert placement.choose(REQUEST, TWO, [True, True]) in (0, 1)
        assert config.serve_flags()[:2] == ["--placement", name]
    config = placement_config("cs-ucb", {"placement_delta": 0.5})
    assert isinstance(config, CsUcbConfig)
    assert config.placement_delta == 0.5
    names = [spec.name for spec in placement_options()]
    assert len(names) == len(set(names))
    assert {"placement_delta", "placement_window", "placement_seed"} <= set(names)
    assert all(spec.flag.startswith("--placement-") for spec in placement_options())
    with pytest.raises(ValueError, match="unknown placement"):
        placement_config("nearest", {})
    with pytest.raises(ValueError, match="placement_window must be at least 1"):
        placement_config("cs-ucb", {"placement_window": 0})
