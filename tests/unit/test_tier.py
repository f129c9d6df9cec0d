"""The tier core as plain Python: three tiers linked in process through the wire encoding."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from recserve.core.cascade import link_tiers
from recserve.core.errors import DeadlineExceeded, FailedPrecondition, InvalidRequest, NotFound
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.core.traces import TraceSet
from recserve.core.transport import Reply
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.policies.simple import FixedConfig, FixedThresholdPolicy, ForwardAllPolicy, RecServeConfig, RecServePolicy
from recserve.v1 import tier_pb2 as pb
from tests.conftest import TRACE_MODELS

NAMES = ("device", "edge", "cloud")


async def cascade(trace_folder: Path, policies, registry: CollectorRegistry | None = None) -> list[Tier]:
    engines = [create_engine("replay", EngineConfig(traces=str(trace_folder), trace_model=m)) for m in TRACE_MODELS]
    for engine in engines:
        await engine.start()
    counter = itertools.count()
    return link_tiers(NAMES, engines, policies, registry=registry, new_request_id=lambda: f"r{next(counter):05d}")


def quiz_request(qid: int, **fields) -> pb.InferRequest:
    return pb.InferRequest(
        prompt=f"quiz question number {qid}?",
        task=pb.TASK_KIND_CHOICE,
        options=["A", "B", "C", "D"],
        family="quiz",
        **fields,
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_forwards_exactly_when_confidence_is_below_the_windowed_quantile(trace_folder: Path) -> None:
    traces = TraceSet.load(trace_folder)
    tiers = await cascade(trace_folder, [RecServePolicy(RecServeConfig(window=8)) for _ in range(3)])
    windows: dict[str, list[float]] = {name: [] for name in NAMES}
    forwarded = 0
    for qid in range(30):
        response = await tiers[0].infer(quiz_request(qid))
        for index, hop in enumerate(response.hops):
            model = TRACE_MODELS[index]
            recorded = traces.answers[("quiz", "test", qid)][model]
            assert hop.tier == NAMES[index]
            assert hop.confidence == pytest.approx(math.exp(recorded.logprob))
            windows[hop.tier].append(hop.confidence)
            window = windows[hop.tier][-8:]
            assert hop.threshold == pytest.approx(float(np.percentile(window, 30.0)))
            should_forward = hop.tier != "cloud" and len(window) >= 2 and hop.confidence < hop.threshold
            assert hop.decision == (pb.DECISION_FORWARDED if should_forward else pb.DECISION_ANSWERED)
        assert response.hops[-1].decision == pb.DECISION_ANSWERED
        assert response.answered_by == response.hops[-1].tier
        forwarded += len(response.hops) > 1
    assert 0 < forwarded < 30


async def test_last_tier_never_forwards_and_hops_are_complete(trace_folder: Path) -> None:
    tiers = await cascade(trace_folder, [ForwardAllPolicy(), ForwardAllPolicy(), ForwardAllPolicy()])
    response = await tiers[0].infer(quiz_request(3))
    assert [h.tier for h in response.hops] == list(NAMES)
    assert [h.decision for h in response.hops] == [pb.DECISION_FORWARDED, pb.DECISION_FORWARDED, pb.DECISION_ANSWERED]
    assert response.answered_by == "cloud"
    assert response.request_id == "r00000"
    assert all(h.engine_seconds > 0 and h.answer for h in response.hops)
    assert response.hops[2].bytes_sent == response.hops[2].bytes_received == 0


async def test_byte_counts_are_the_serialized_sizes(trace_folder: Path) -> None:
    registry = CollectorRegistry()
    tiers = await cascade(trace_folder, [ForwardAllPolicy(), ForwardAllPolicy(), ForwardAllPolicy()], registry)
    request = quiz_request(5, request_id="fixed-id")
    response = await tiers[0].infer(request)
    device_hop, edge_hop, cloud_hop = response.hops

    # What the edge sent to the cloud: the request with two hops; what came back: the cloud's response
    # before the edge filled in its own byte counts.
    to_cloud = pb.InferRequest()
    to_cloud.CopyFrom(request)
    to_cloud.hops.extend([_without_bytes(device_hop), _without_bytes(edge_hop)])
    from_cloud = pb.InferResponse()
    from_cloud.CopyFrom(response)
    from_cloud.hops[0].CopyFrom(_without_bytes(device_hop))
    from_cloud.hops[1].CopyFrom(_without_bytes(edge_hop))
    assert edge_hop.bytes_sent == len(to_cloud.SerializeToString())
    assert edge_hop.bytes_received == len(from_cloud.SerializeToString())

    to_edge = pb.InferRequest()
    to_edge.CopyFrom(request)
    to_edge.hops.append(_without_bytes(device_hop))
    from_edge = pb.InferResponse()
    from_edge.CopyFrom(response)
    from_edge.hops[0].CopyFrom(_without_bytes(device_hop))
    assert device_hop.bytes_sent == len(to_edge.SerializeToString())
    assert device_hop.bytes_received == len(from_edge.SerializeToString())

    def counted(tier: str, peer: str, direction: str) -> float:
        labels = {"tier": tier, "peer": peer, "direction": direction}
        return sample(registry, "recserve_transmitted_bytes_total", **labels)

    assert counted("device", "edge", "sent") == device_hop.bytes_sent
    assert counted("device", "edge", "received") == device_hop.bytes_received
    assert counted("edge", "cloud", "sent") == edge_hop.bytes_sent
    assert counted("edge", "cloud", "received") == edge_hop.bytes_received
    assert cloud_hop.bytes_sent == 0


def _without_bytes(hop: pb.Hop) -> pb.Hop:
    copy = pb.Hop()
    copy.CopyFrom(hop)
    copy.bytes_sent = copy.bytes_received = 0
    return copy


async def test_local_only_requests_stay_on_the_first_tier(trace_folder: Path) -> None:
    tiers = await cascade(trace_folder, [ForwardAllPolicy(), ForwardAllPolicy(), ForwardAllPolicy()])
    response = await tiers[0].infer(quiz_request(1, offload=pb.OFFLOAD_MODE_LOCAL_ONLY))
    assert response.answered_by == "device"
    assert len(response.hops) == 1


async def test_references_and_feedback_feed_the_answering_tiers_accuracy(trace_folder: Path) -> None:
    registry = CollectorRegistry()
    never, always = FixedThresholdPolicy(FixedConfig(threshold=0.0)), FixedThresholdPolicy(FixedConfig(threshold=2.0))
    tiers = await cascade(trace_folder, [always, never, never], registry)
    traces = TraceSet.load(trace_folder)
    gold = traces.queries[0].gold
    judged = await tiers[0].infer(quiz_request(0, reference=gold))
    assert judged.answered_by == "edge"
    recorded = traces.answers[("quiz", "test", 0)]["medium"]
    assert judged.chosen_option == recorded.answer
    verdict = "right" if recorded.answer == gold else "wrong"
    labels = {"tier": "edge", "family": "quiz", "verdict": verdict}
    assert sample(registry, "recserve_judged_answers_total", **labels) == 1

    response = await tiers[0].infer(quiz_request(1))
    reply = await tiers[0].feedback(pb.FeedbackRequest(request_id=response.request_id, correct=True))
    assert reply.recorded_by == "edge"
    assert sample(registry, "recserve_judged_answers_total", tier="edge", family="quiz", verdict="right") == 1 + (
        verdict == "right"
    )
    with pytest.raises(FailedPrecondition, match="already judged"):
        await tiers[0].feedback(pb.FeedbackRequest(request_id=response.request_id, correct=False))
    with pytest.raises(FailedPrecondition, match="already judged"):
        await tiers[0].feedback(pb.FeedbackRequest(request_id=judged.request_id, correct=False))
    with pytest.raises(NotFound, match="no record of request"):
        await tiers[0].feedback(pb.FeedbackRequest(request_id="unknown", correct=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "x" * 40_000}, "accepts at most"),
        ({"task": pb.TASK_KIND_UNSPECIFIED}, "task is unspecified"),
        ({"task": 7}, "unknown task kind 7"),
        ({"options": []}, "at least two options"),
        ({"options": ["A", "A"]}, "distinct"),
        ({"options": [str(i) for i in range(30)]}, "at most 26"),
        ({"sampling": pb.SamplingParams(max_tokens=100_000)}, "max_tokens 100000 is out of range"),
        ({"sampling": pb.SamplingParams(temperature=-1)}, "temperature"),
        ({"sampling": pb.SamplingParams(temperature=math.nan)}, "temperature"),
        ({"family": "no spaces please"}, "family"),
        ({"offload": 5}, "unknown offload mode"),
        ({"hops": [pb.Hop(tier="edge")]}, "clients, which send no hops"),
        ({"request_id": "x" * 129}, "longer than 128"),
        ({"request_id": "forged\nline"}, "line breaks"),
    ],
)
async def test_bad_requests_are_rejected_with_a_clear_message(trace_folder: Path, change, message: str) -> None:
    tiers = await cascade(trace_folder, [RecServePolicy(RecServeConfig()) for _ in range(3)])
    request = quiz_request(0)
    for field, value in change.items():
        if isinstance(value, list):
            del getattr(request, field)[:]
            getattr(request, field).extend(value)
        elif field == "sampling":
            request.sampling.CopyFrom(value)
        else:
            setattr(request, field, value)
    with pytest.raises(InvalidRequest, match=message):
        await tiers[0].infer(request)
    # The tier keeps serving.
    assert (await tiers[0].infer(quiz_request(0))).answer


@pytest.mark.parametrize(
    ("hops", "message"),
    [
        ([*(pb.Hop(tier=f"t{i}") for i in range(7)), pb.Hop(tier="device")], "limit is 8"),
        ([pb.Hop(tier="edge"), pb.Hop(tier="device")], "forwarding loop"),
        ([pb.Hop(tier="cloud")], "from device only, not from cloud"),
        ([pb.Hop(tier="device\nforged")], "not a tier name"),
        ([pb.Hop(tier="device", answer="x" * 40_000)], "answer of hop device is longer than 32768"),
        ([pb.Hop(tier="device", confidence=math.nan)], "not a finite number"),
        ([pb.Hop(tier="device", byte_price=-1.0)], "byte price of hop device must be a finite number"),
        ([pb.Hop(tier="device", byte_price=math.inf)], "byte price of hop device must be a finite number"),
    ],
)
async def test_hops_come_from_the_callers_and_are_bounded(trace_folder: Path, hops, message: str) -> None:
    tiers = await cascade(trace_folder, [RecServePolicy(RecServeConfig()) for _ in range(3)])
    with pytest.raises(InvalidRequest, match=message):
        await tiers[1].infer(quiz_request(0, hops=hops))
    assert (await tiers[1].infer(quiz_request(0, hops=[pb.Hop(tier="device")]))).answer


async def test_generate_with_options_and_unknown_prompts(trace_folder: Path) -> None:
    tiers = await cascade(trace_folder, [RecServePolicy(RecServeConfig()) for _ in range(3)])
    with pytest.raises(InvalidRequest, match="only for CHOICE"):
        await tiers[0].infer(
            pb.InferRequest(prompt="chat question number 1?", task=pb.TASK_KIND_GENERATE, options=["A"])
        )
    with pytest.raises(NotFound, match="no recorded answer"):
        await tiers[0].infer(pb.InferRequest(prompt="unrecorded", task=pb.TASK_KIND_GENERATE))


async def test_an_expired_deadline_is_reported(trace_folder: Path) -> None:
    engine = create_engine("replay", EngineConfig(traces=str(trace_folder), trace_model="small"))
    await engine.start()
    times = iter([0.0, 0.0, 5.0])  # request starts, engine starts, deadline checked after 5 s
    metrics = TierMetrics.standalone(CollectorRegistry(), "device")
    tier = Tier("device", engine, RecServePolicy(RecServeConfig()), metrics, clock=lambda: next(times))
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await tier.infer(quiz_request(0), timeout=1.0)


class RecordingPolicy(FixedThresholdPolicy):
    """A fixed-threshold policy that keeps what it is told, to check the verdict plumbing; its forwards are
    probes sent at `probe_rate` when one is given, and its decisions set `byte_price` when one is given."""

    def __init__(self, threshold: float, probe_rate: float | None = None, byte_price: float | None = None) -> None:
        super().__init__(FixedConfig(threshold=threshold))
        self.probe_rate = probe_rate
        self.byte_price = byte_price
        self.verdicts: list[tuple[str, float, bool, bool, float | None]] = []
        self.lower_seen: list[tuple[float, ...]] = []
        self.prices_seen: list[float | None] = []
        self.costs: list[tuple[str, int, tuple[int, ...], tuple[float, ...], tuple[int, ...]]] = []

    def decide(self, family: str, confidence: float, *, is_last: bool, lower=(), byte_price=None):  # type: ignore[no-untyped-def]
        self.lower_seen.append(tuple(lower))
        self.prices_seen.append(byte_price)
        verdict = super().decide(family, confidence, is_last=is_last, lower=lower)
        return replace(verdict, probe_rate=self.probe_rate if verdict.forward else None, byte_price=self.byte_price)

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        self.verdicts.append((family, confidence, correct, answered_here, probe_rate))

    def observe_cost(
        self,
        family: str,
        *,
        size: int,
        spent: Sequence[int],
        lower: Sequence[float] = (),
        answer_sizes: Sequence[int] = (),
    ) -> None:
        self.costs.append((family, size, tuple(spent), tuple(lower), tuple(answer_sizes)))


async def test_policies_learn_verdicts_and_see_the_lower_confidences(trace_folder: Path) -> None:
    """Verdicts reach each tier's policy with the decision's probe rate, by Feedback and by reference."""
    policies = [RecordingPolicy(2.0, probe_rate=0.25), RecordingPolicy(0.0), RecordingPolicy(0.0)]
    tiers = await cascade(trace_folder, policies)
    by_feedback = await tiers[0].infer(quiz_request(6))
    await tiers[0].feedback(pb.FeedbackRequest(request_id=by_feedback.request_id, correct=True))
    device_hop, edge_hop = by_feedback.hops
    assert policies[0].verdicts == [("quiz", device_hop.confidence, True, False, 0.25)]
    assert policies[1].verdicts == [("quiz", edge_hop.confidence, True, True, None)]
    assert policies[1].lower_seen == [(device_hop.confidence,)]

    reference = by_feedback.chosen_option or "A"
    by_reference = await tiers[0].infer(quiz_request(7, reference=reference))
    right = TraceSet.load(trace_folder).answers[("quiz", "test", 7)]["medium"].answer == reference
    assert policies[0].verdicts[-1] == ("quiz", by_reference.hops[0].confidence, right, False, 0.25)
    assert policies[1].verdicts[-1] == ("quiz", by_reference.hops[1].confidence, right, True, None)
    assert policies[2].verdicts == []


async def test_the_first_tiers_byte_price_reaches_the_tiers_above_in_its_hop(trace_folder: Path) -> None:
    priced = [RecordingPolicy(2.0, byte_price=0.75), RecordingPolicy(2.0), RecordingPolicy(0.0)]
    response = await (await cascade(trace_folder, priced))[0].infer(quiz_request(6))
    assert response.hops[0].byte_price == 0.75
    assert [policy.prices_seen for policy in priced] == [[None], [0.75], [0.75]]
    # A price of 0 is a price; no price is none.
    unpriced = [RecordingPolicy(2.0, byte_price=0.0), RecordingPolicy(2.0), RecordingPolicy(0.0)]
    await (await cascade(trace_folder, unpriced))[0].infer(quiz_request(6))
    assert unpriced[1].prices_seen == [0.0]
    plain = [RecordingPolicy(2.0), RecordingPolicy(2.0), RecordingPolicy(0.0)]
    response = await (await cascade(trace_folder, plain))[0].infer(quiz_request(6))
    assert not response.hops[0].HasField("byte_price")
    assert plain[1].prices_seen == [None]


async def test_policies_learn_the_bytes_each_request_took_on_every_link_above(trace_folder: Path) -> None:
    """The device forwards, the edge answers; then the device forwards, the edge forwards, the cloud answers. Each
    tier also learns the answers' lengths of the tiers the request reached, from itself up."""
    policies = [RecordingPolicy(2.0), RecordingPolicy(0.0), RecordingPolicy(0.0)]
    tiers = await cascade(trace_folder, policies)
    to_edge = await tiers[0].infer(quiz_request(6))
    policies[1] = tiers[1].policy = RecordingPolicy(2.0)
    to_cloud = await tiers[0].infer(quiz_request(7))
    device_hop, edge_hop, _ = to_cloud.hops
    link = [to_edge.hops[0].bytes_sent + to_edge.hops[0].bytes_received]
    links = [device_hop.bytes_sent + device_hop.bytes_received, edge_hop.bytes_sent + edge_hop.bytes_received]
    sent = quiz_request(7, request_id="r00001")
    lower = (to_cloud.hops[0].confidence, to_cloud.hops[1].confidence)
    answers = tuple(len(hop.answer.encode()) for hop in to_cloud.hops)
    assert all(answers)
    assert policies[0].costs == [
        (
            "quiz",
            reported_size(quiz_request(6, request_id="r00000"), to_edge.hops, 0),
            tuple(link),
            (),
            tuple(len(hop.answer.encode()) for hop in to_edge.hops),
        ),
        ("quiz", reported_size(sent, to_cloud.hops, 0), tuple(links), (), answers),
    ]
    assert policies[1].costs == [("quiz", reported_size(sent, to_cloud.hops, 1), (links[1],), lower[:1], answers[1:])]
    assert policies[2].costs == [("quiz", reported_size(sent, to_cloud.hops, 2), (), lower, answers[2:])]


def reported_size(sent: pb.InferRequest, hops: Sequence[pb.Hop], tier: int) -> int:
    """The size tier `tier` reports to its policy: what it would forward, the request it received (the client's
    with the hops below it) plus its own hop, byte counts not yet filled in."""
    received = pb.InferRequest()
    received.CopyFrom(sent)
    received.hops.extend(_without_bytes(hop) for hop in hops[:tier])
    return received.ByteSize() + _without_bytes(hops[tier]).ByteSize()


class NamingUpstream:
    """A next tier that answers every request, calling itself by the next of `names`."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = iter(names)

    async def infer(self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False) -> Reply:
        response = pb.InferResponse(answer="A", hops=[*request.hops, pb.Hop(tier=next(self.names))])
        return Reply(response, request.ByteSize(), response.ByteSize())

    async def feedback(self, request: pb.FeedbackRequest, timeout: float | None) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def test_the_next_tier_is_one_peer_label_whatever_its_replies_call_it(trace_folder: Path) -> None:
    engine = create_engine("replay", EngineConfig(traces=str(trace_folder), trace_model="small"))
    await engine.start()
    registry = CollectorRegistry()
    upstream = NamingUpstream(["x" * 1000, "edge", "spoof-1", "spoof-2"])
    tier = Tier("device", engine, ForwardAllPolicy(), TierMetrics.standalone(registry, "device"), upstream)
    for qid in range(4):
        await tier.infer(quiz_request(qid))
    peers = {s.labels["peer"] for m in registry.collect() for s in m.samples if s.name.startswith("recserve_trans")}
    assert peers == {"next", "edge"}
