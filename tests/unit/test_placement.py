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
    PinnedPlacement,
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


INTERACTIVE = PlacementRequest(family="chat", requirement_seconds=5.0, service_class="interactive")
BACKGROUND = PlacementRequest(family="chat", requirement_seconds=60.0, service_class="background")


def learn(
    placement: CsUcbPlacement, candidates: tuple[Candidate, ...], index: int, outcomes: list[tuple[float, float]]
) -> None:
    """Outcomes (seconds, joules) of candidate `index`, one at a time, as if each had been sent and answered alone."""
    for seconds, joules in outcomes:
        placement.in_flight(index, +1)
        placement.observe(REQUEST, candidates, index, PlacementOutcome(seconds, joules, True))
        placement.in_flight(index, -1)


def test_cs_ucb_sends_a_tight_request_past_a_long_queue_and_a_loose_one_to_the_cheap_server() -> None:
    rng = random.Random(8)
    fast, cheap = Candidate("edge-gpu"), Candidate("edge-box")
    pair = (fast, cheap)
    placement = CsUcbPlacement()
    learn(placement, pair, 0, [(0.5 * rng.uniform(0.9, 1.1), 120.0 * rng.uniform(0.9, 1.1)) for _ in range(16)])
    learn(placement, pair, 1, [(1.5 * rng.uniform(0.9, 1.1), 40.0 * rng.uniform(0.9, 1.1)) for _ in range(16)])
    # No queue: both meet 5 s, and the cheap one costs a third.
    assert placement.choose(BACKGROUND, pair, [True, True]) == 1
    assert placement.choose(INTERACTIVE, pair, [True, True]) == 1
    for _ in range(5):  # five of this tier's requests wait there: about six times its time for the next
        placement.in_flight(1, +1)
    assert placement.choose(INTERACTIVE, pair, [True, True]) == 0
    assert placement.choose(BACKGROUND, pair, [True, True]) == 1
    for _ in range(5):
        placement.in_flight(1, -1)
    assert placement.choose(INTERACTIVE, pair, [True, True]) == 1


def drain_after_a_burst(placement: CsUcbPlacement, pair: tuple[Candidate, ...], at_send: bool) -> None:
    """30 of this tier's requests sent to candidate 0 (a server of one request at a time, 0.5 s each) in a burst,
    each behind those before it; answered in turn while nothing more is sent, so the queue drains to none."""
    for _ in range(30):
        placement.in_flight(0, +1)
    for behind in range(30):
        outcome = PlacementOutcome(0.5 * (1 + behind), 30.0, True, load_at_send=behind if at_send else None)
        placement.observe(TIGHT, pair, 0, outcome)
        placement.in_flight(0, -1)


TIGHT = PlacementRequest(family="chat", requirement_seconds=2.0, service_class="interactive")


def test_cs_ucb_judges_answers_by_the_queue_they_joined_not_the_one_left_when_they_came() -> None:
    fast, steady_one = Candidate("edge-gpu"), Candidate("edge-box")
    pair = (fast, steady_one)
    placement = CsUcbPlacement()
    learn(placement, pair, 1, [(1.2, 40.0)] * 16)  # meets 2 s, but costs more
    drain_after_a_burst(placement, pair, at_send=True)
    # The last answers took 8-15 s because each waited behind 15-29 others; idle now, the server is fast again.
    assert placement.choose(TIGHT, pair, [True, True]) == 0
    # Judged by the load left when each answer came (15 down to none), the same answers look slow for longer.
    stale = CsUcbPlacement()
    learn(stale, pair, 1, [(1.2, 40.0)] * 16)
    drain_after_a_burst(stale, pair, at_send=False)
    assert stale.choose(TIGHT, pair, [True, True]) == 1


def test_cs_ucb_does_not_trust_one_fast_outcome_with_a_tight_request() -> None:
    rng = random.Random(9)
    steady_one, new = Candidate("edge-gpu"), Candidate("cloud", level=2)
    pair = (steady_one, new)
    placement = CsUcbPlacement()
    # Service times as variable as an exponential's (request sizes vary), 1 s on average.
    learn(placement, pair, 0, [(rng.expovariate(1.0), 100.0) for _ in range(16)])
    learn(placement, pair, 1, [(1.9, 20.0)])  # one answer, cheap and fast enough for 5 s
    # Its spread is the tier's pooled one until it has its own: 1.9 s may well be 5 s next time.
    assert placement.choose(BACKGROUND, pair, [True, True]) == 1
    assert placement.choose(INTERACTIVE, pair, [True, True]) == 0


def test_cs_ucb_waits_for_a_tried_candidates_first_answer() -> None:
    three = (EDGE, Candidate("edge-b"), CLOUD)
    placement = CsUcbPlacement()
    for index in range(3):  # each tried once, in order; none has answered
        assert placement.choose(REQUEST, three, [True] * 3) == index
        placement.in_flight(index, +1)
    placement.in_flight(0, -1)
    assert placement.choose(REQUEST, three, [True] * 3) == 0  # the fewest in flight while nothing is known
    placement.observe(REQUEST, three, 1, PlacementOutcome(0.5, 10.0, True))
    placement.in_flight(1, -1)
    # Only edge-b has answered: the others are not sent more before their first answer.
    assert [placement.choose(REQUEST, three, [True] * 3) for _ in range(5)] == [1] * 5


def test_cs_ucb_probes_only_cheaper_candidates_and_only_with_the_loosest_requests() -> None:
    rng = random.Random(10)
    cheap, fast, dear = Candidate("edge-box"), Candidate("edge-gpu"), Candidate("cloud", level=2)
    three = (cheap, fast, dear)
    servers = {name: steady(seconds, joules, rng) for name, seconds, joules in
               (("edge-box", 4.0, 50.0), ("edge-gpu", 1.0, 200.0), ("cloud", 1.0, 400.0))}  # fmt: skip
    tight = PlacementRequest(family="chat", requirement_seconds=2.0)
    loose = PlacementRequest(family="chat", requirement_seconds=2.5)  # still too tight for the edge box
    placement = CsUcbPlacement(CsUcbConfig(placement_probe=20))
    picks: list[tuple[str, str]] = []
    for step in range(400):
        request = loose if step % 10 == 9 else tight
        chosen = placement.choose(request, three, [True] * 3)
        seconds, joules = servers[three[chosen].name](step)
        placement.observe(request, three, chosen, PlacementOutcome(seconds, joules, seconds <= 2.0))
        picks.append((three[chosen].name, "loose" if request is loose else "tight"))
    later = picks[10:]
    assert Counter(name for name, _ in later)["edge-gpu"] >= 370
    assert not any(name == "cloud" for name, _ in later)  # dearer than the choice: never probed
    probes = [kind for name, kind in later if name == "edge-box"]
    assert 5 <= len(probes) <= 400 // 20  # cheaper: probed, every `probe` decisions at most
    assert set(probes) == {"loose"}  # and on loose requests only


def test_cs_ucb_weighs_inference_and_transmission_energy() -> None:
    near, far = Candidate("edge-a"), Candidate("edge-b")
    pair = (near, far)

    def trained(config: CsUcbConfig) -> CsUcbPlacement:
        placement = CsUcbPlacement(config)
        for _ in range(8):
            placement.observe(REQUEST, pair, 0, PlacementOutcome(0.5, 100.0, True))  # all inference
            placement.observe(REQUEST, pair, 1, PlacementOutcome(0.5, 120.0, True, transmission_joules=60.0))
        return placement

    assert trained(CsUcbConfig()).choose(REQUEST, pair, [True, True]) == 0
    half = CsUcbConfig(placement_transmission_weight=0.5)  # 60 + 30 weighed against 100
    assert trained(half).choose(REQUEST, pair, [True, True]) == 1
    assert trained(half).estimate(far) == (0.5, 90.0)


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


def test_pinned_keeps_to_its_candidate_fails_over_while_it_is_unusable_and_names_a_missing_one() -> None:
    candidates = (Candidate("edge-a"), Candidate("edge-b"), CLOUD)
    pinned = PinnedPlacement("edge-b")
    assert [pinned.choose(REQUEST, candidates, [True] * 3) for _ in range(3)] == [1, 1, 1]
    assert pinned.choose(REQUEST, candidates, [True, False, True]) == 0
    assert pinned.choose(REQUEST, candidates, [False, False, True]) == 2
    with pytest.raises(ValueError, match="no candidate is named 'edge-c'; the candidates are edge-a, edge-b, cloud"):
        PinnedPlacement("edge-c").choose(REQUEST, candidates, [True] * 3)
    with pytest.raises(
        ValueError, match=r"pinned placement: placement_pin must name one of the candidates \(--placement-pin NAME\)"
    ):
        placement_config("pinned", {})


def test_no_usable_candidate_is_an_error() -> None:
    with pytest.raises(ValueError, match="no usable"):
        FirstPlacement().choose(REQUEST, TWO, [False, False])


def test_registry_builds_each_placement_from_its_options() -> None:
    assert PLACEMENT_NAMES == (
        "cs-ucb",
        "random",
        "round-robin",
        "least-loaded",
        "edge-first",
        "cloud-only",
        "pinned",
        "first",
    )
    for name in PLACEMENT_NAMES:
        values = {"placement_seed": 3, "placement_delta": 0.5, "placement_pin": "cloud", "beta": 0.2}
        config = placement_config(name, values)
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
