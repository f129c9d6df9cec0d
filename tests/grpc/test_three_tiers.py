"""Three real gRPC tiers in this process, on loopback port 0, with replay engines."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recserve.server.app import RunningTier, start_tier
from recserve.server.settings import TierSettings
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.conftest import TRACE_MODELS

NAMES = ("device", "edge", "cloud")


@dataclass
class Stack:
    tiers: list[RunningTier]
    channel: grpc.aio.Channel
    stub: pb_grpc.TierServiceStub

    def bytes_counted(self, index: int, peer: str, direction: str) -> float:
        labels = {"tier": NAMES[index], "peer": peer, "direction": direction}
        return self.tiers[index].registry.get_sample_value("recserve_transmitted_bytes_total", labels) or 0.0


async def start_stack(trace_folder: Path, **policy: object) -> Stack:
    tiers: list[RunningTier] = []
    next_address = ""
    for index, (name, model) in reversed(list(enumerate(zip(NAMES, TRACE_MODELS, strict=True)))):
        settings = TierSettings.with_defaults(
            tier=name, host="127.0.0.1", port=0, next=next_address, callers=NAMES[index - 1] if index else "",
            engine="replay", traces=str(trace_folder), trace_model=model, plaintext=True, **policy,
        )  # fmt: skip
        running = await start_tier(settings)
        tiers.insert(0, running)
        next_address = running.address
    channel = grpc.aio.insecure_channel(tiers[0].address)
    return Stack(tiers, channel, pb_grpc.TierServiceStub(channel))


async def stop_stack(stack: Stack) -> None:
    await stack.channel.close()
    for running in stack.tiers:
        await running.stop(grace=1)


@pytest.fixture
async def stack(trace_folder: Path) -> AsyncIterator[Stack]:
    stack = await start_stack(trace_folder, window=8)
    yield stack
    await stop_stack(stack)


def quiz(qid: int, **fields: object) -> pb.InferRequest:
    return pb.InferRequest(
        prompt=f"quiz question number {qid}?", task=pb.TASK_KIND_CHOICE, options=["A", "B", "C", "D"], family="quiz",
        **fields,
    )  # fmt: skip


async def test_health_and_reflection(stack: Stack) -> None:
    for running in stack.tiers:
        async with grpc.aio.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "recserve.v1.TierService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = [s.name async for r in replies for s in r.list_services_response.service]
            assert "recserve.v1.TierService" in names
            assert "grpc.health.v1.Health" in names


async def test_decisions_hops_and_bytes_across_three_tiers(stack: Stack) -> None:
    sent_by_client = received_by_client = 0
    link_bytes = {("device", "edge"): 0, ("edge", "cloud"): 0}
    answered_by: dict[str, int] = {}
    for qid in range(30):
        request = quiz(qid, request_id=f"q{qid}")
        response = await stack.stub.Infer(request)
        sent_by_client += len(request.SerializeToString())
        received_by_client += len(response.SerializeToString())
        answered_by[response.answered_by] = answered_by.get(response.answered_by, 0) + 1
        assert [hop.tier for hop in response.hops] == list(NAMES[: len(response.hops)])
        for hop in response.hops[:-1]:
            assert hop.decision == pb.DECISION_FORWARDED
            assert hop.confidence < hop.threshold
            assert hop.bytes_sent > 0
            assert hop.bytes_received > 0
        last = response.hops[-1]
        assert last.decision == pb.DECISION_ANSWERED
        assert last.tier == "cloud" or not last.confidence < last.threshold or qid == 0
        assert response.confidence.value == last.confidence
        for lower, upper in zip(response.hops, response.hops[1:], strict=False):
            link_bytes[(lower.tier, upper.tier)] += lower.bytes_sent + lower.bytes_received
    assert set(answered_by) == set(NAMES), answered_by

    # Every tier counts the bytes on its links, at both ends, and they agree with the hop records.
    assert stack.bytes_counted(0, "client", "received") == sent_by_client
    assert stack.bytes_counted(0, "client", "sent") == received_by_client
    for index, (lower, upper) in enumerate(link_bytes):
        at_lower = stack.bytes_counted(index, upper, "sent") + stack.bytes_counted(index, upper, "received")
        at_upper = stack.bytes_counted(index + 1, lower, "sent") + stack.bytes_counted(index + 1, lower, "received")
        assert at_lower == at_upper == link_bytes[(lower, upper)] > 0
        assert stack.bytes_counted(index, upper, "sent") == stack.bytes_counted(index + 1, lower, "received")


async def test_the_last_tier_never_forwards(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder, policy="forward-all")
    try:
        for qid in range(5):
            response = await stack.stub.Infer(quiz(qid))
            assert response.answered_by == "cloud"
            assert [h.decision for h in response.hops][-1] == pb.DECISION_ANSWERED
        cloud = stack.tiers[2].registry
        assert cloud.get_sample_value("recserve_requests_total", {"tier": "cloud", "outcome": "answered"}) == 5
        assert cloud.get_sample_value("recserve_requests_total", {"tier": "cloud", "outcome": "forwarded"}) is None
    finally:
        await stop_stack(stack)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.InferRequest(task=pb.TASK_KIND_GENERATE), "prompt is empty"),
        (pb.InferRequest(prompt="x" * 40_000, task=pb.TASK_KIND_GENERATE), "accepts at most"),
        (pb.InferRequest(prompt="quiz question number 1?", task=pb.TASK_KIND_CHOICE), "at least two options"),
        (
            pb.InferRequest(prompt="q", task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=10**6)),
            "max_tokens 1000000 is out of range",
        ),
        (pb.InferRequest(prompt="q", task=9), "unknown task kind 9"),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_tier_keeps_serving(
    stack: Stack, request_: pb.InferRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Infer(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert (await stack.stub.Infer(quiz(2))).answer


async def test_malformed_bytes_are_invalid_argument(stack: Stack) -> None:
    raw = stack.channel.unary_unary("/recserve.v1.TierService/Infer")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid recserve.v1.InferRequest" in (caught.value.details() or "")


async def test_unknown_prompt_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Infer(pb.InferRequest(prompt="never recorded", task=pb.TASK_KIND_GENERATE))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no recorded answer" in (caught.value.details() or "")


async def test_feedback_reaches_the_tier_that_answered(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder, policy="forward-all")
    try:
        response = await stack.stub.Infer(quiz(4))
        reply = await stack.stub.Feedback(pb.FeedbackRequest(request_id=response.request_id, correct=False))
        assert reply.recorded_by == "cloud"
        labels = {"tier": "cloud", "family": "quiz", "verdict": "wrong"}
        assert stack.tiers[2].registry.get_sample_value("recserve_judged_answers_total", labels) == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Feedback(pb.FeedbackRequest(request_id="nobody"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop_stack(stack)


async def test_a_dead_next_tier_gives_degraded_answers_and_the_breaker_stops_waiting(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder, policy="forward-all", breaker_failures=2, breaker_cooldown=0.2)
    try:
        await stack.tiers[1].stop(grace=0)
        for qid in range(4):
            response = await stack.stub.Infer(quiz(qid), timeout=10)
            assert response.answered_by == "device"
            assert response.degraded
            assert [h.decision for h in response.hops] == [pb.DECISION_DEGRADED]
        device = stack.tiers[0].registry
        assert device.get_sample_value("recserve_requests_total", {"tier": "device", "outcome": "degraded"}) == 4
        assert device.get_sample_value("recserve_upstream_breaker_open", {"tier": "device"}) == 1
        breaker = stack.tiers[0].tier.breaker
        assert breaker is not None
        assert not breaker.closed
        # The edge comes back; after the cool-down one probe goes through, and the breaker closes.
        edge = stack.tiers[1]
        stack.tiers[1] = await start_tier(dataclasses.replace(edge.settings, port=edge.port))
        await asyncio.sleep(0.3)
        response = await stack.stub.Infer(quiz(9), timeout=10)
        assert response.answered_by == "cloud"
        assert not response.degraded
        assert breaker.closed
        assert device.get_sample_value("recserve_upstream_breaker_open", {"tier": "device"}) == 0
    finally:
        await stop_stack(stack)


async def test_overload_is_refused_at_once_with_resource_exhausted(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder, policy="local")
    try:
        servicer_limit = 1
        stack.tiers[0].tier.engine = SlowEngine(stack.tiers[0].tier.engine, seconds=0.5)
        stack.tiers[0].servicer.max_in_flight = servicer_limit
        first = asyncio.ensure_future(stack.stub.Infer(quiz(1), timeout=10))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Infer(quiz(2), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 requests" in (caught.value.details() or "")
        assert (await first).answered_by == "device"
        assert (await stack.stub.Infer(quiz(3), timeout=10)).answered_by == "device"
        rejected = {"tier": "device", "outcome": "rejected"}
        assert stack.tiers[0].registry.get_sample_value("recserve_requests_total", rejected) == 1
    finally:
        await stop_stack(stack)


class SlowEngine:
    """Wraps an engine to take a fixed time per request, to hold requests in flight."""

    def __init__(self, inner, seconds: float) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.seconds, self.name = inner, seconds, "slow"

    async def generate(self, request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.seconds)
        return await self.inner.generate(request)

    async def healthy(self) -> bool:
        return bool(await self.inner.healthy())

    async def shutdown(self) -> None:
        await self.inner.shutdown()


async def test_stopping_a_tier_says_not_serving_first_and_lets_requests_in_flight_finish(trace_folder: Path) -> None:
    """RunningTier.stop, what SIGTERM runs: health watchers hear NOT_SERVING while the tier still answers what it
    has started, then new requests are refused and the engine is released."""
    stack = await start_stack(trace_folder, policy="local")
    device = stack.tiers[0]
    device.tier.engine = SlowEngine(device.tier.engine, seconds=1.0)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await asyncio.wait_for(watch.read(), timeout=5)).status == serving
            in_flight = asyncio.ensure_future(stack.stub.Infer(quiz(1), timeout=10))
            await asyncio.sleep(0.2)
            stopping = asyncio.ensure_future(device.stop(grace=5))
            assert (await asyncio.wait_for(watch.read(), timeout=5)).status == not_serving
            assert not in_flight.done(), "NOT_SERVING comes before the server stops, not after"
            watch.cancel()
            assert (await in_flight).answered_by == "device"
            await asyncio.wait_for(stopping, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Infer(quiz(2), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not await device.tier.engine.healthy()
    finally:
        await stop_stack(stack)


async def test_an_engine_that_stops_working_turns_health_not_serving(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder)
    edge = stack.tiers[1]
    try:
        watch = asyncio.create_task(edge.watch_engine(interval=0.05))
        await asyncio.sleep(0.2)
        assert not watch.done(), "a working engine keeps the tier serving"
        await edge.tier.engine.shutdown()  # the engine is gone, as when vLLM's engine core dies
        await asyncio.wait_for(watch, timeout=5)
        async with grpc.aio.insecure_channel(edge.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "recserve.v1.TierService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await stop_stack(stack)


async def test_the_deadline_propagates_and_a_too_slow_cloud_gives_a_degraded_answer_in_time(trace_folder: Path) -> None:
    stack = await start_stack(trace_folder, policy="forward-all")
    try:
        stack.tiers[2].tier.engine = SlowEngine(stack.tiers[2].tier.engine, seconds=3.0)
        started = asyncio.get_running_loop().time()
        response = await stack.stub.Infer(quiz(5), timeout=1.0)
        elapsed = asyncio.get_running_loop().time() - started
        # The edge gave up on the cloud within its share of the client's deadline and answered itself.
        assert response.answered_by == "edge"
        assert response.degraded
        assert [h.decision for h in response.hops] == [pb.DECISION_FORWARDED, pb.DECISION_DEGRADED]
        assert elapsed < 1.0
    finally:
        await stop_stack(stack)
