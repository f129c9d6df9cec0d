"""A tier with several next-tier candidates: the placement picks one, a request may skip a tier, Feedback and bytes
follow the link each request took, requirements travel up as what is left of them, energy is accounted per hop."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from recserve.core.breaker import CircuitBreaker
from recserve.core.energy import EnergyModel
from recserve.core.errors import InvalidRequest, UpstreamUnavailable
from recserve.core.links import Link
from recserve.core.metrics import Metrics
from recserve.core.placement import Candidate, PlacementOutcome, PlacementRequest
from recserve.core.tier import Tier
from recserve.core.transport import InProcessUpstream
from recserve.policies.simple import ForwardAllPolicy
from recserve.v1 import tier_pb2 as pb
from tests.unit.test_tier import sample
from tests.unit.test_tier_stream import WordEngine, collect


class ScriptedPlacement:
    """Chooses the candidates named in `script`, in turn, and keeps what it was told."""

    def __init__(self, script: Sequence[str]) -> None:
        self.script = list(script)
        self.seen: list[tuple[PlacementRequest, list[bool]]] = []
        self.outcomes: list[tuple[str, PlacementOutcome]] = []
        self.loads: dict[int, int] = {}

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        self.seen.append((request, list(usable)))
        name = self.script.pop(0)
        return [c.name for c in candidates].index(name)

    def observe(
        self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int, outcome: PlacementOutcome
    ) -> None:
        self.outcomes.append((candidates[chosen].name, outcome))

    def in_flight(self, chosen: int, delta: int) -> None:
        self.loads[chosen] = self.loads.get(chosen, 0) + delta


class DownUpstream:
    async def infer(self, request, timeout, *, wait_for_ready=False):  # type: ignore[no-untyped-def]
        raise UpstreamUnavailable("next tier at edge-b failed: UNAVAILABLE: connection refused")

    async def infer_stream(self, request, timeout, *, wait_for_ready=False):  # type: ignore[no-untyped-def]
        raise UpstreamUnavailable("next tier at edge-b failed: UNAVAILABLE: connection refused")
        yield  # pragma: no cover

    async def feedback(self, request, timeout):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def close(self) -> None:
        return None


ENERGY = EnergyModel(busy_watts=10.0, joules_per_token=0.5, joules_per_byte=0.001)


def topology(placement: ScriptedPlacement, registry: CollectorRegistry, *, clock=None) -> dict[str, Tier]:  # type: ignore[no-untyped-def]
    """device -> {edge-a, edge-b} -> cloud, and device -> cloud skipping the edges."""
    metrics = Metrics(registry)
    extra = {"clock": clock} if clock else {}

    def tier(name: str, text: str, **fields) -> Tier:  # type: ignore[no-untyped-def]
        return Tier(
            name, WordEngine(text), ForwardAllPolicy(), metrics.for_tier(name), energy=ENERGY, **fields, **extra
        )

    cloud = tier("cloud", "cloud says hi", callers=("edge-a", "edge-b", "device"))
    to_cloud = [Link(InProcessUpstream(cloud), peer_name="cloud")]
    edges = {name: tier(name, f"{name} says hi", callers=("device",), links=to_cloud) for name in ("edge-a", "edge-b")}
    links = [
        Link(InProcessUpstream(edges["edge-a"]), peer_name="edge-a"),
        Link(InProcessUpstream(edges["edge-b"]), peer_name="edge-b"),
        Link(InProcessUpstream(cloud), level=2, peer_name="cloud"),
    ]
    device = tier("device", "device says hi", links=links, placement=placement)
    return {"device": device, **edges, "cloud": cloud}


def question(**fields: object) -> pb.InferRequest:
    return pb.InferRequest(prompt="hello", task=pb.TASK_KIND_GENERATE, family="chat", **fields)  # type: ignore[arg-type]


async def test_the_placement_picks_the_candidate_and_bytes_and_feedback_follow_it() -> None:
    registry = CollectorRegistry()
    placement = ScriptedPlacement(["edge-b", "edge-a", "cloud"])
    tiers = topology(placement, registry)
    paths = []
    for number in range(3):
        response = await tiers["device"].infer(question(request_id=f"q{number}"))
        paths.append([hop.tier for hop in response.hops])
    assert paths == [["device", "edge-b", "cloud"], ["device", "edge-a", "cloud"], ["device", "cloud"]]
    for peer in ("edge-a", "edge-b", "cloud"):
        assert sample(registry, "recserve_transmitted_bytes_total", tier="device", peer=peer, direction="sent") > 0
    assert [name for name, _ in placement.outcomes] == ["edge-b", "edge-a", "cloud"]
    assert all(outcome.met and outcome.energy_joules > 0 for _, outcome in placement.outcomes)
    # The links' share of it, apart (for PerLLM's ω weights): the device's link and every link above.
    assert all(0 < outcome.transmission_joules < outcome.energy_joules for _, outcome in placement.outcomes)
    assert all(load == 0 for load in placement.loads.values())
    # Feedback on q0 goes the way q0 went: device -> edge-b -> cloud, which answered it.
    reply = await tiers["device"].feedback(pb.FeedbackRequest(request_id="q0", correct=True))
    assert reply.recorded_by == "cloud"


async def test_each_outcome_carries_the_queue_its_request_joined_at_the_candidate() -> None:
    placement = ScriptedPlacement(["edge-b"] * 3)
    tiers = topology(placement, CollectorRegistry())
    tiers["edge-b"].engine.delay = 0.01  # slow enough that the three are up there at once
    await asyncio.gather(*(tiers["device"].infer(question(request_id=f"q{n}")) for n in range(3)))
    # Sent one after another, each behind those sent before it: what CS-UCB scales its expected time by.
    assert sorted(outcome.load_at_send for _, outcome in placement.outcomes) == [0, 1, 2]
    assert placement.loads == {1: 0}


async def test_a_down_candidate_is_not_usable_once_its_breaker_opens_and_the_request_is_answered_anyway() -> None:
    registry = CollectorRegistry()
    placement = ScriptedPlacement(["edge-b", "edge-a"])
    tiers = topology(placement, registry)
    device = tiers["device"]
    down = Link(DownUpstream(), CircuitBreaker(lambda: 0.0, failures=1, cooldown=60.0), peer_name="edge-b")
    device.links.links[1] = down
    first = await device.infer(question())
    assert first.degraded
    assert placement.outcomes[-1][1].failed
    second = await device.infer(question())
    assert [hop.tier for hop in second.hops] == ["device", "edge-a", "cloud"]
    assert placement.seen[-1][1] == [True, False, True]  # edge-b's breaker is open


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_what_is_left_of_the_requirement_goes_up_and_met_or_missed_is_counted(streamed: bool) -> None:
    registry = CollectorRegistry()
    now = [100.0]
    tiers = topology(ScriptedPlacement(["edge-a", "edge-a"]), registry, clock=lambda: now[0])
    seen: list[float] = []
    edge = tiers["edge-a"]
    infer, infer_stream = edge.infer, edge.infer_stream

    async def spy(request: pb.InferRequest, timeout: float | None = None) -> pb.InferResponse:
        seen.append(request.requirement_seconds)
        now[0] += 2.0  # the edge and the cloud take 2 s
        return await infer(request, timeout)

    def stream_spy(request: pb.InferRequest, timeout: float | None = None):  # type: ignore[no-untyped-def]
        seen.append(request.requirement_seconds)
        now[0] += 2.0
        return infer_stream(request, timeout)

    edge.infer, edge.infer_stream = spy, stream_spy  # type: ignore[method-assign]
    request = question(requirement_seconds=1.5, service_class="interactive")
    response = await (collect(tiers["device"].infer_stream(request)) if streamed else tiers["device"].infer(request))
    assert seen == [1.5]  # no time passed at the device on this clock
    final = response[1] if streamed else response
    assert final.answered_by == "cloud"
    assert sample(registry, "recserve_requirements_total", tier="device", outcome="missed") == 1
    assert sample(registry, "recserve_requirements_total", tier="edge-a", outcome="met") == 1


@pytest.mark.parametrize(
    ("fields", "timeout", "message"),
    [
        ({"requirement_seconds": 0.0}, None, "not a positive number of seconds"),
        ({"requirement_seconds": -1.0}, None, "not a positive number of seconds"),
        ({"requirement_seconds": math.nan}, None, "not a positive number of seconds"),
        ({"requirement_seconds": 5.0}, 2.0, "beyond the call's deadline"),
        ({"service_class": "batch jobs!"}, None, "service_class"),
    ],
)
async def test_a_bad_requirement_is_rejected_with_the_reason(fields: dict, timeout: float | None, message: str) -> None:
    tiers = topology(ScriptedPlacement([]), CollectorRegistry())
    with pytest.raises(InvalidRequest, match=message):
        await tiers["device"].infer(question(**fields), timeout)


async def test_the_energy_counters_equal_the_sum_over_the_hop_records() -> None:
    registry = CollectorRegistry()
    tiers = topology(ScriptedPlacement(["edge-a", "edge-b", "cloud"] * 4), registry)
    totals: dict[tuple[str, str], float] = {}
    for _ in range(12):
        response = await tiers["device"].infer(question())
        for hop in response.hops:
            totals[(hop.tier, "inference")] = totals.get((hop.tier, "inference"), 0.0) + hop.inference_joules
            totals[(hop.tier, "transmission")] = totals.get((hop.tier, "transmission"), 0.0) + hop.transmission_joules
    for (tier, kind), joules in totals.items():
        counted = sample(registry, "recserve_energy_joules_total", tier=tier, kind=kind)
        assert counted == pytest.approx(joules)
    # Inference: the cloud's 3 tokens at 0.5 J each (the word engine takes next to no time); transmission: 1 mJ a byte.
    assert totals[("cloud", "inference")] == pytest.approx(12 * 3 * 0.5, rel=0.01)
    device = tiers["device"]
    sent = sum(
        sample(registry, "recserve_transmitted_bytes_total", tier="device", peer=peer, direction=direction)
        for peer in ("edge-a", "edge-b", "cloud")
        for direction in ("sent", "received")
    )
    assert totals[("device", "transmission")] == pytest.approx(sent * 0.001)
    assert device.energy is ENERGY


async def test_cs_ucb_skips_the_edge_when_only_the_cloud_meets_the_requirement() -> None:
    """The edge is cheap but takes 0.2 s; the cloud is fast but costly. With a 0.1 s requirement the device learns
    to skip the edge; without one it sends its requests to the cheaper edge."""
    from recserve.policies.placement import placement_config

    metrics = Metrics(CollectorRegistry())
    cloud = Tier("cloud", WordEngine("cloud answer"), ForwardAllPolicy(), metrics.for_tier("cloud"),
                 callers=("edge", "device"), energy=EnergyModel(joules_per_token=10.0))  # fmt: skip
    edge = Tier("edge", WordEngine("edge answer", delay=0.1), ForwardAllPolicy(), metrics.for_tier("edge"),
                callers=("device",), energy=EnergyModel(joules_per_token=0.1))  # fmt: skip
    # The edge answers itself here (the last tier of its own chain), so its outcome is its own time and energy.
    links = [
        Link(InProcessUpstream(edge), peer_name="edge"),
        Link(InProcessUpstream(cloud), level=2, peer_name="cloud"),
    ]
    placement = placement_config("cs-ucb").build()
    device = Tier("device", WordEngine("device"), ForwardAllPolicy(), metrics.for_tier("device"), links=links,
                  placement=placement)  # fmt: skip

    async def served_by(**fields: object) -> list[str]:
        return [(await device.infer(question(**fields))).answered_by for _ in range(12)]

    strict = await served_by(requirement_seconds=0.1)
    assert strict[2:] == ["cloud"] * 10  # after trying each once
    relaxed = await served_by()
    assert relaxed[-5:] == ["edge"] * 5
