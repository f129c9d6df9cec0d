"""Progressive inference at a tier (PICE): the next tier sketches, this tier expands every point at once, repairs the
points it is unsure of above, and falls back to its own answer whenever a whole answer cannot be had that way."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from recserve.core.engine import EngineError, Generation, GenerationRequest, TextDelta
from recserve.core.errors import InvalidRequest, StreamInterrupted
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.metrics import Metrics
from recserve.core.placement import Candidate, PlacementOutcome, PlacementRequest
from recserve.core.progressive import (
    ProgressiveDecision,
    ProgressiveOptions,
    ProgressivePath,
    UpstreamLoad,
)
from recserve.core.sketch import assemble, parse_sketch
from recserve.core.tier import Tier
from recserve.core.transport import InProcessUpstream
from recserve.policies.simple import ForwardAllPolicy, LocalOnlyPolicy
from recserve.v1 import tier_pb2 as pb
from tests.unit.test_tier import RecordingPolicy, sample
from tests.unit.test_tier_stream import collect

SKETCH = "1. Plan the week ahead\n2. Cut needless meetings\n3. Rest enough\n"
POINTS = parse_sketch(SKETCH, 10)
QUESTION = "How can I improve my time management skills?"
POINT_NUMBER = re.compile(r"Write point (\d+) \(")


class SketchingEngine:
    """Writes SKETCH for a sketch request (one with a grammar), "<name> on point N." for an expansion, and a plain
    answer otherwise. Log-probs per point are `logprobs[N]` (default -0.1); `failing` points raise EngineError.
    Every generation takes `delay`, a plain answer `answer_delay` where given. Counts the generations in flight at
    once."""

    def __init__(
        self,
        name: str,
        *,
        sketch: str = SKETCH,
        logprobs: dict[int, float] | None = None,
        failing: Sequence[int] = (),
        delay: float = 0.01,
        sketch_fails: bool = False,
        answer_delay: float | None = None,
    ) -> None:
        self.name = name
        self.sketch = sketch
        self.logprobs = logprobs or {}
        self.failing = set(failing)
        self.delay = delay
        self.answer_delay = answer_delay
        self.sketch_fails = sketch_fails
        self.aborted = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests: list[GenerationRequest] = []

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        asked = POINT_NUMBER.search(request.messages[-1].content) if request.messages else None
        plain = not request.options and not request.grammar and asked is None
        try:
            await asyncio.sleep(self.answer_delay if plain and self.answer_delay is not None else self.delay)
        finally:
            self.in_flight -= 1
        if request.options:
            return Generation(
                text=request.options[0], token_logprobs=(-0.1,), option_logprobs=(-0.1,) * len(request.options)
            )
        if request.grammar:
            if self.sketch_fails:
                raise EngineError("the sketching model is gone")
            return _generation(self.sketch, -0.05)
        if asked is None:
            return _generation(f"{self.name} answers in full.", -0.2)
        number = int(asked.group(1))
        if number in self.failing:
            raise EngineError(f"point {number} failed")
        return _generation(f"{self.name} on point {number}.", self.logprobs.get(number, -0.1))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        generation = await self.generate(request)
        yield TextDelta(generation.text, ())
        yield generation

    async def healthy(self) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


def _generation(text: str, logprob: float) -> Generation:
    words = text.split(" ")
    return Generation(text=text, token_logprobs=(logprob,) * len(words), completion_tokens=len(words), prompt_tokens=7)


class Always:
    """A scheduler that takes one path, and records what it was shown."""

    def __init__(self, path: ProgressivePath, max_points: int = 10) -> None:
        self.decision = ProgressiveDecision(path, max_points if path is ProgressivePath.PROGRESSIVE else 0, "test")
        self.loads: list[UpstreamLoad | None] = []
        self.lengths: list[tuple[int, int]] = []

    def decide(self, question: str, max_tokens: int, load: UpstreamLoad | None) -> ProgressiveDecision:
        self.loads.append(load)
        return self.decision

    def observe_answer(self, completion_tokens: int, max_tokens: int) -> None:
        self.lengths.append((completion_tokens, max_tokens))


def edge_and_cloud(
    edge: SketchingEngine,
    cloud: SketchingEngine,
    scheduler: Always | None = None,
    *,
    registry: CollectorRegistry | None = None,
    options: ProgressiveOptions | None = None,
    edge_policy: ForwardAllPolicy | LocalOnlyPolicy | None = None,
    clock: list[float] | None = None,
    forward_timeout: ForwardTimeout | None = None,
    ensemble: SketchingEngine | None = None,
) -> tuple[Tier, Tier]:
    metrics = Metrics(registry or CollectorRegistry())
    now = clock or [0.0]
    cloud_tier = Tier("cloud", cloud, ForwardAllPolicy(), metrics.for_tier("cloud"), callers=("edge",), capacity=8)
    edge_tier = Tier(
        "edge",
        edge,
        edge_policy or LocalOnlyPolicy(),
        metrics.for_tier("edge"),
        InProcessUpstream(cloud_tier),
        progressive=scheduler or Always(ProgressivePath.PROGRESSIVE),
        progressive_options=options or ProgressiveOptions(point_beta=0.34),
        forward_timeout=forward_timeout,
        clock=(lambda: now[0]) if clock is not None else __import__("time").monotonic,
        ensemble=ensemble,
    )
    return edge_tier, cloud_tier


def long_question(**fields: object) -> pb.InferRequest:
    request = pb.InferRequest(prompt=QUESTION, task=pb.TASK_KIND_GENERATE, family="advice", **fields)  # type: ignore[arg-type]
    request.sampling.max_tokens = 600
    return request


async def test_the_cloud_sketches_the_edge_expands_every_point_at_once_and_assembles_them() -> None:
    registry = CollectorRegistry()
    edge, cloud = SketchingEngine("edge"), SketchingEngine("cloud")
    edge_tier, _ = edge_and_cloud(edge, cloud, registry=registry)
    response = await edge_tier.infer(long_question())

    assert response.answer == assemble(POINTS, [f"edge on point {n}." for n in (1, 2, 3)])
    assert response.answered_by == "edge"
    mine, sketched = response.hops
    assert mine.decision == pb.DECISION_PROGRESSIVE
    assert list(mine.progressive.points) == list(POINTS)
    assert mine.progressive.sketched_by == "cloud"
    assert sketched.tier == "cloud"
    assert mine.progressive.sketch_tokens == len(SKETCH.split(" "))
    assert [e.repaired_by for e in mine.progressive.expansions] == ["", "", ""]
    assert all(e.engine_seconds > 0 and e.completion_tokens == 4 for e in mine.progressive.expansions)
    # The cloud wrote the sketch alone, under our grammar; the edge wrote the three points, all in flight at once.
    assert len(cloud.requests) == 1
    assert cloud.requests[0].grammar
    assert len(edge.requests) == 3
    assert edge.most_in_flight == 3
    # The link's bytes: in the hop and in the counters alike.
    assert mine.bytes_sent > 0
    assert mine.bytes_received > 0
    sent = sample(registry, "recserve_transmitted_bytes_total", tier="edge", peer="cloud", direction="sent")
    received = sample(registry, "recserve_transmitted_bytes_total", tier="edge", peer="cloud", direction="received")
    assert (sent, received) == (mine.bytes_sent, mine.bytes_received)
    assert (
        sample(registry, "recserve_progressive_requests_total", tier="edge", path="progressive", outcome="served") == 1
    )
    assert sample(registry, "recserve_progressive_points_total", tier="edge", outcome="kept") == 3
    saved = 12 - mine.progressive.sketch_tokens
    assert sample(registry, "recserve_cloud_tokens_saved_total", tier="edge") == max(saved, 0)
    assert sample(registry, "recserve_sketches_total", tier="cloud", outcome="parsed") == 1


async def test_a_point_the_edge_is_unsure_of_is_written_again_by_the_cloud_the_others_are_kept() -> None:
    registry = CollectorRegistry()
    edge = SketchingEngine("edge", logprobs={2: -3.0})
    edge_tier, _ = edge_and_cloud(edge, SketchingEngine("cloud"), registry=registry)
    response = await edge_tier.infer(long_question())

    assert response.answer == assemble(POINTS, ["edge on point 1.", "cloud on point 2.", "edge on point 3."])
    expansions = response.hops[0].progressive.expansions
    assert [e.repaired_by for e in expansions] == ["", "cloud", ""]
    assert expansions[1].confidence < expansions[1].threshold
    assert [h.tier for h in response.hops] == ["edge", "cloud", "cloud"]  # the sketch, then the repair
    assert sample(registry, "recserve_progressive_points_total", tier="edge", outcome="repaired") == 1
    assert sample(registry, "recserve_progressive_points_total", tier="edge", outcome="kept") == 2


async def test_a_second_edge_model_writes_again_the_points_the_first_is_unsure_of_before_the_cloud_is_asked() -> None:
    """The ensemble: point 2's first expansion is below the threshold; the second model's clears it and is kept, so
    the cloud writes only the sketch. Where the second model is unsure too (point 3), the cloud writes the point."""
    registry = CollectorRegistry()
    edge = SketchingEngine("edge", logprobs={2: -3.0, 3: -3.0})
    second = SketchingEngine("second", logprobs={2: -0.05, 3: -4.0})
    cloud = SketchingEngine("cloud")
    edge_tier, _ = edge_and_cloud(
        edge, cloud, registry=registry, ensemble=second, options=ProgressiveOptions(point_beta=0.9)
    )
    # Two plain answers first, so that the point window has a threshold to compare the second model's point with.
    await edge_tier.infer(long_question())
    registry_before = sample(registry, "recserve_progressive_points_total", tier="edge", outcome="repaired")
    cloud.requests.clear()
    response = await edge_tier.infer(long_question())

    assert response.answer == assemble(POINTS, ["edge on point 1.", "second on point 2.", "cloud on point 3."])
    expansions = response.hops[0].progressive.expansions
    assert [e.repaired_by for e in expansions] == ["", "", "cloud"]
    assert [e.ensemble_kept for e in expansions] == [False, True, False]
    assert [e.HasField("ensemble_confidence") for e in expansions] == [False, True, True]
    assert expansions[1].confidence < expansions[1].threshold <= expansions[1].ensemble_confidence
    assert expansions[2].ensemble_confidence < expansions[2].threshold
    # The cloud sketched and wrote point 3 only; the second model saw only the points the first was unsure of.
    assert [bool(r.grammar) for r in cloud.requests] == [True, False]
    assert {POINT_NUMBER.search(r.messages[-1].content).group(1) for r in second.requests} == {"2", "3"}  # type: ignore[union-attr]
    assert sample(registry, "recserve_progressive_points_total", tier="edge", outcome="ensemble") >= 1
    assert sample(registry, "recserve_progressive_points_total", tier="edge", outcome="repaired") == registry_before + 1


async def test_with_the_cloud_down_the_more_confident_of_the_two_edge_expansions_is_kept() -> None:
    edge = SketchingEngine("edge", logprobs={2: -3.0})
    second = SketchingEngine("second", logprobs={2: -2.0})
    edge_tier, cloud_tier = edge_and_cloud(
        edge, SketchingEngine("cloud"), ensemble=second, options=ProgressiveOptions(point_beta=0.9)
    )
    await edge_tier.infer(long_question())
    cloud_tier.engine = SketchingEngine("cloud", failing=[2])
    response = await edge_tier.infer(long_question())
    assert response.answer == assemble(POINTS, ["edge on point 1.", "second on point 2.", "edge on point 3."])
    point = response.hops[0].progressive.expansions[1]
    assert point.ensemble_kept
    assert point.repaired_by == ""


async def test_a_failed_second_model_leaves_the_point_to_the_cloud() -> None:
    second = SketchingEngine("second", failing=[2])
    edge_tier, _ = edge_and_cloud(
        SketchingEngine("edge", logprobs={2: -3.0}), SketchingEngine("cloud"), ensemble=second
    )
    response = await edge_tier.infer(long_question())
    assert response.answer == assemble(POINTS, ["edge on point 1.", "cloud on point 2.", "edge on point 3."])
    point = response.hops[0].progressive.expansions[1]
    assert not point.HasField("ensemble_confidence")
    assert point.repaired_by == "cloud"


async def test_a_failed_expansion_is_written_by_the_cloud_and_the_answer_has_no_hole() -> None:
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge", failing=[3]), SketchingEngine("cloud"))
    response = await edge_tier.infer(long_question())
    assert response.answer == assemble(POINTS, ["edge on point 1.", "edge on point 2.", "cloud on point 3."])
    assert response.hops[0].progressive.expansions[2].repaired_by == "cloud"


async def test_a_point_written_nowhere_falls_back_to_the_edges_whole_answer() -> None:
    registry = CollectorRegistry()
    cloud = SketchingEngine("cloud", failing=[3])
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge", failing=[3]), cloud, registry=registry)
    response = await edge_tier.infer(long_question())
    assert response.answer == "edge answers in full."
    assert response.degraded
    assert response.hops[-1].decision == pb.DECISION_DEGRADED
    outcome = {"tier": "edge", "path": "progressive", "outcome": "point_failed"}
    assert sample(registry, "recserve_progressive_requests_total", **outcome) == 1


async def test_a_sketch_that_does_not_parse_is_answered_directly_and_counted() -> None:
    registry = CollectorRegistry()
    cloud = SketchingEngine("cloud", sketch="Sure! Time management is about priorities.")
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), cloud, registry=registry, edge_policy=ForwardAllPolicy())
    response = await edge_tier.infer(long_question())
    # The cascade as usual: this edge forwards everything, and the cloud answers the question in full.
    assert response.answered_by == "cloud"
    assert response.answer == "cloud answers in full."
    assert not response.degraded
    assert sample(registry, "recserve_sketches_total", tier="cloud", outcome="unparsable") == 1
    outcome = {"tier": "edge", "path": "progressive", "outcome": "unparsable"}
    assert sample(registry, "recserve_progressive_requests_total", **outcome) == 1


async def test_with_the_cloud_down_the_edge_answers_directly_degraded() -> None:
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud", sketch_fails=True))
    response = await edge_tier.infer(long_question())
    assert response.answer == "edge answers in full."
    assert response.degraded
    assert response.answered_by == "edge"


async def test_a_streamed_progressive_answer_sends_each_point_in_order_then_the_final() -> None:
    edge = SketchingEngine("edge", logprobs={1: -3.0})  # the first point waits on its repair: order still holds
    edge_tier, _ = edge_and_cloud(edge, SketchingEngine("cloud"))
    unary = await edge_tier.infer(long_question())
    deltas, final = await collect(edge_tier.infer_stream(long_question()))
    texts = [d.text for d in deltas]
    assert len(texts) == 3
    assert all(t.lstrip("\n").startswith(f"{n}. **") for n, t in enumerate(texts, start=1))
    assert "".join(texts) == assemble(POINTS, [f"{'cloud' if n == 1 else 'edge'} on point {n}." for n in (1, 2, 3)])
    assert final.answer == ""
    assert final.hops[0].decision == pb.DECISION_PROGRESSIVE
    assert unary.answer.startswith("1. **Plan the week ahead**")


async def test_a_stream_whose_point_fails_after_points_were_sent_ends_with_an_error() -> None:
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge", failing=[3]), SketchingEngine("cloud", failing=[3]))
    deltas: list[pb.TokenDelta] = []

    async def read() -> None:
        async for event in edge_tier.infer_stream(long_question()):
            deltas.append(event.delta)

    with pytest.raises(StreamInterrupted, match="incomplete"):
        await read()
    assert len(deltas) == 2  # points 1 and 2, then the explicit error: never a silently short answer


async def test_cloud_direct_forwards_without_generating_and_local_is_the_cascade() -> None:
    edge, cloud = SketchingEngine("edge"), SketchingEngine("cloud")
    edge_tier, _ = edge_and_cloud(edge, cloud, Always(ProgressivePath.CLOUD_DIRECT))
    response = await edge_tier.infer(long_question())
    assert response.answered_by == "cloud"
    assert edge.requests == []
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud"), Always(ProgressivePath.LOCAL))
    assert (await edge_tier.infer(long_question())).answer == "edge answers in full."


async def test_sketches_and_points_do_not_shorten_the_time_the_edge_waits_for_a_whole_answer() -> None:
    # The forward timeout is a multiple of recent forward latencies. A sketch or a point is a small part of an answer:
    # learnt from, it would cut the wait below what a whole answer (cloud-direct, or the cascade) takes.
    scheduler = Always(ProgressivePath.PROGRESSIVE)
    timeout = ForwardTimeout(ceiling=5.0, floor=0.001, factor=3.0, min_samples=2)
    cloud = SketchingEngine("cloud", delay=0.01, answer_delay=0.2)
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), cloud, scheduler, forward_timeout=timeout)
    for _ in range(3):
        assert (await edge_tier.infer(long_question())).hops[0].decision == pb.DECISION_PROGRESSIVE
    scheduler.decision = ProgressiveDecision(ProgressivePath.CLOUD_DIRECT, 0, "test")
    response = await edge_tier.infer(long_question())
    assert response.answered_by == "cloud"
    assert not response.degraded
    assert response.answer == "cloud answers in full."


async def test_the_scheduler_sees_the_clouds_last_load_until_it_is_stale_and_learns_answer_lengths() -> None:
    clock = [100.0]
    scheduler = Always(ProgressivePath.PROGRESSIVE)
    options = ProgressiveOptions(load_max_age_seconds=10.0)
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud"), scheduler, options=options,
                                  clock=clock)  # fmt: skip
    await edge_tier.infer(long_question())
    clock[0] += 5.0
    await edge_tier.infer(long_question())
    clock[0] += 10.5
    await edge_tier.infer(long_question())
    first, second, third = scheduler.loads
    assert first is None  # nothing heard yet
    assert second == UpstreamLoad(in_flight=1, capacity=8, age_seconds=5.0)  # the cloud's reply said so
    assert third is None  # heard 10.5 s ago: too old to count
    assert scheduler.lengths == [(12, 600)] * 3


async def test_only_generate_requests_with_a_next_tier_and_automatic_offload_are_scheduled() -> None:
    scheduler = Always(ProgressivePath.PROGRESSIVE)
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud"), scheduler)
    await edge_tier.infer(long_question(offload=pb.OFFLOAD_MODE_LOCAL_ONLY))
    await edge_tier.infer(pb.InferRequest(prompt="A or B?", task=pb.TASK_KIND_CHOICE, options=["A", "B"]))
    assert scheduler.loads == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": pb.TASK_KIND_SKETCH}, "sketch.max_points 0 is out of range: use 1 to 10"),
        ({"task": pb.TASK_KIND_SKETCH, "sketch": pb.SketchParams(max_points=11)}, "max_points 11 is out of range"),
        ({"task": pb.TASK_KIND_SKETCH, "sketch": pb.SketchParams(max_points=3, max_words=99)}, "max_words 99"),
        ({"task": pb.TASK_KIND_EXPAND, "expand": pb.ExpandParams(points=["a"], index=1)}, "expand.index 1 names no"),
        ({"task": pb.TASK_KIND_EXPAND}, "expand.points has 0 points"),
        ({"task": pb.TASK_KIND_EXPAND, "expand": pb.ExpandParams(points=[" "])}, "must be non-blank"),
        ({"task": pb.TASK_KIND_GENERATE, "sketch": pb.SketchParams(max_points=3)}, "only for TASK_KIND_SKETCH"),
        ({"task": pb.TASK_KIND_CHOICE, "options": ["A", "B"], "expand": pb.ExpandParams(points=["a"])}, "only for"),
    ],
)
async def test_malformed_parts_are_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    _, cloud_tier = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud"))
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        await cloud_tier.infer(pb.InferRequest(prompt=QUESTION, **fields))  # type: ignore[arg-type]


class RecordingPlacement:
    """A placement that always takes the first candidate and records what it is told."""

    def __init__(self) -> None:
        self.outcomes: list[PlacementOutcome] = []

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        return 0

    def observe(
        self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int, outcome: PlacementOutcome
    ) -> None:
        self.outcomes.append(outcome)

    def in_flight(self, index: int, delta: int) -> None:
        return None


async def test_a_parts_quick_reply_does_not_teach_the_placement_but_its_failure_does() -> None:
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge", logprobs={2: -3.0}), SketchingEngine("cloud"))
    placement = RecordingPlacement()
    edge_tier.links.placement = placement
    await edge_tier.infer(long_question())  # a sketch and a repair went up, and came back
    assert placement.outcomes == []
    edge_tier, _ = edge_and_cloud(SketchingEngine("edge"), SketchingEngine("cloud", sketch_fails=True))
    edge_tier.links.placement = placement
    await edge_tier.infer(long_question())
    assert [outcome.failed for outcome in placement.outcomes] == [True]


async def test_the_tier_below_pays_for_the_parts_but_does_not_take_a_progressive_answer_for_a_cloud_only_one() -> None:
    """device → edge (progressive, one point repaired) → cloud: the device's policy learns that the request cost the
    bytes of its own link and of the edge's calls for the sketch and the repair, as one entry (the request crossed one
    link: a budget policy must not take the edge's answer for a reply that crossed every link)."""
    metrics = Metrics(CollectorRegistry())
    cloud = Tier("cloud", SketchingEngine("cloud"), ForwardAllPolicy(), metrics.for_tier("cloud"), callers=("edge",))
    edge = Tier(
        "edge",
        SketchingEngine("edge", logprobs={2: -3.0}),
        LocalOnlyPolicy(),
        metrics.for_tier("edge"),
        InProcessUpstream(cloud),
        callers=("device",),
        progressive=Always(ProgressivePath.PROGRESSIVE),
        progressive_options=ProgressiveOptions(point_beta=0.34),
    )
    recording = RecordingPolicy(2.0)
    device = Tier("device", SketchingEngine("device"), recording, metrics.for_tier("device"), InProcessUpstream(edge))
    response = await device.infer(long_question())
    device_hop, edge_hop, *cloud_hops = response.hops
    assert edge_hop.decision == pb.DECISION_PROGRESSIVE
    assert [h.tier for h in cloud_hops] == ["cloud", "cloud"]  # the sketch and the repair
    ((family, _, spent, lower, answer_sizes),) = recording.costs
    assert family == "advice"
    assert lower == ()
    # The answers the request reached: the device's and the edge's assembled one, not the cloud's sketch.
    assert answer_sizes == (len(device_hop.answer.encode()), len(edge_hop.answer.encode()))
    link_bytes = device_hop.bytes_sent + device_hop.bytes_received
    parts_bytes = edge_hop.bytes_sent + edge_hop.bytes_received
    assert parts_bytes > 0
    assert spent == (link_bytes + parts_bytes,)
