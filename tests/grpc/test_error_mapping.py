"""The servicer's refusals and failures on the wire: each domain error reaches the caller as its status code with
its message, written for a person; any other error is INTERNAL, its internals kept in the tier's log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from recserve.core import errors
from recserve.core.engine import Generation, GenerationRequest
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.policies.simple import LocalOnlyPolicy
from recserve.server.servicer import TierServicer, add_tier_service
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

# What each domain error becomes on the wire, written out apart from server/status.py's table, so that a wrong
# or missing row there fails here.
EXPECTED_CODES: dict[type[errors.RecServeError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UpstreamUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamTimedOut: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.StreamInterrupted: grpc.StatusCode.ABORTED,
}


class ScriptedEngine:
    """Answers once `gate` is open, or fails with `error` when one is set."""

    name = "scripted"

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        self.entered.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return Generation(text="an answer", token_logprobs=(-0.1, -0.2))

    async def healthy(self) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


@dataclass
class Served:
    servicer: TierServicer
    engine: ScriptedEngine
    channel: grpc.aio.Channel
    registry: CollectorRegistry

    @property
    def stub(self) -> pb_grpc.TierServiceStub:
        return pb_grpc.TierServiceStub(self.channel)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"tier": "device", **labels})


@asynccontextmanager
async def serving(*, ready: bool = True, max_in_flight: int = 256, auth_token: str = "") -> AsyncIterator[Served]:
    """The servicer over a real tier and scripted engine, on a real gRPC server on loopback."""
    registry = CollectorRegistry()
    engine = ScriptedEngine()
    tier = Tier("device", engine, LocalOnlyPolicy(), TierMetrics.standalone(registry, "device"))
    servicer = TierServicer(tier, max_in_flight=max_in_flight, auth_token=auth_token)
    servicer.ready = ready
    server = grpc.aio.server()
    add_tier_service(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(servicer, engine, channel, registry)
    finally:
        await server.stop(0)


def question(number: int = 1) -> pb.InferRequest:
    return pb.InferRequest(prompt=f"question {number}?", task=pb.TASK_KIND_GENERATE)


async def refusal(served: Served, metadata: tuple[tuple[str, str], ...] | None = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Infer(question(), timeout=10, metadata=metadata)
    return caught.value


def subclasses(kind: type[errors.RecServeError]) -> set[type[errors.RecServeError]]:
    return {sub for direct in kind.__subclasses__() for sub in {direct, *subclasses(direct)}}


def test_every_domain_error_has_an_expected_status() -> None:
    assert subclasses(errors.RecServeError) == set(EXPECTED_CODES)


@pytest.mark.parametrize("error", list(EXPECTED_CODES), ids=lambda kind: kind.__name__)
async def test_a_domain_error_reaches_the_caller_as_its_status_with_its_message(
    error: type[errors.RecServeError],
) -> None:
    message = f"{error.__name__}: here is what to change before retrying"
    async with serving() as served:
        served.engine.error = error(message)
        caught = await refusal(served)
        assert served.sample("recserve_requests_total", outcome="error") == 1
    assert caught.code() == EXPECTED_CODES[error]
    assert caught.details() == message


async def test_an_unexpected_error_is_internal_and_its_internals_stay_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as served:
        served.engine.error = KeyError("/srv/models/secret-weights.gguf")
        caught = await refusal(served)
    assert caught.code() == grpc.StatusCode.INTERNAL
    assert caught.details() == "internal error in tier device; see its log"
    assert "secret-weights" in caplog.text
    assert "Traceback" in caplog.text


async def test_a_malformed_message_is_an_invalid_argument_that_names_the_expected_message() -> None:
    async with serving() as served:
        infer = served.channel.unary_unary("/recserve.v1.TierService/Infer")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the request is not a valid recserve.v1.InferRequest message"


async def test_a_tier_still_loading_its_engine_refuses_with_unavailable() -> None:
    async with serving(ready=False) as served:
        caught = await refusal(served)
        assert not served.engine.entered.is_set()
    assert caught.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.details() == "tier device is still loading its engine"


async def test_a_call_without_the_token_is_unauthenticated_and_told_what_to_send() -> None:
    async with serving(auth_token="s3cret") as served:
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            caught = await refusal(served, metadata)
            assert caught.code() == grpc.StatusCode.UNAUTHENTICATED
            assert caught.details() == "tier device needs 'authorization: Bearer <token>' metadata with its token"
        assert not served.engine.entered.is_set()
        answer = await served.stub.Infer(question(), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
    assert answer.answered_by == "device"


async def test_beyond_its_limit_a_tier_refuses_at_once_and_counts_its_calls_in_flight() -> None:
    async with serving(max_in_flight=1) as served:
        served.engine.gate.clear()
        first = asyncio.ensure_future(served.stub.Infer(question(1), timeout=10))
        await asyncio.wait_for(served.engine.entered.wait(), timeout=10)
        assert served.sample("recserve_in_flight_requests") == 1
        caught = await refusal(served)
        assert caught.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.details() == "tier device is serving its limit of 1 requests; retry with backoff"
        assert served.sample("recserve_requests_total", outcome="rejected") == 1
        served.engine.gate.set()
        assert (await first).answered_by == "device"
        assert served.sample("recserve_in_flight_requests") == 0
        assert (await served.stub.Infer(question(2), timeout=10)).answered_by == "device"
