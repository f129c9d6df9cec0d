"""Hung, slow and misbehaving next tiers, and callers who would poison the breaker, against a real device tier on
loopback: the device keeps answering, its breaker opens within 2 s of a hang and closes within 2 s of the peer's
return, and only the next tier's own failures count against it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from recserve.core.breaker import CircuitBreaker
from recserve.server.app import RunningTier, start_tier
from recserve.server.servicer import SERVICE_NAME
from recserve.server.settings import TierSettings
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.grpc.test_three_tiers import quiz

# Room for a long status message, so that a test sees the status a tier sent rather than a transport error.
LONG_METADATA = [("grpc.max_metadata_size", 1024 * 1024), ("grpc.absolute_max_metadata_size", 1024 * 1024)]


class FakePeer:
    """A next tier whose behaviour the test sets: answer (after a delay), hang until told otherwise, or fail."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.status: grpc.StatusCode | None = None
        self.message = ""
        self.running = asyncio.Event()
        self.running.set()

    def answer(self, delay: float = 0.0) -> None:
        self.delay, self.status = delay, None
        self.running.set()

    def hang(self) -> None:
        """Calls arrive and wait, as on a stopped process, until the peer answers again."""
        self.running.clear()

    def fail(self, status: grpc.StatusCode, message: str) -> None:
        self.status, self.message = status, message
        self.running.set()

    async def infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self.running.wait()
        if self.status is not None:
            await context.abort(self.status, self.message)
        await asyncio.sleep(self.delay)
        request = pb.InferRequest.FromString(data)
        response = pb.InferResponse(
            request_id=request.request_id, answer="B", answered_by="edge", hops=[*request.hops, pb.Hop(tier="edge")]
        )
        return response.SerializeToString()


@dataclass
class Device:
    running: RunningTier
    peer: FakePeer
    stub: pb_grpc.TierServiceStub

    @property
    def breaker(self) -> CircuitBreaker:
        assert self.running.tier.breaker is not None
        return self.running.tier.breaker

    @property
    def degraded_answers(self) -> float:
        labels = {"tier": "device", "outcome": "degraded"}
        return self.running.registry.get_sample_value("recserve_requests_total", labels) or 0.0

    async def warm_up(self, calls: int = 20) -> None:
        """Enough answered forwards for the forward timeout to follow the peer's latency (floor 1 s here)."""
        for qid in range(calls):
            assert (await self.stub.Infer(quiz(qid % 30), timeout=10)).answered_by == "edge"


@asynccontextmanager
async def device_before(peer: FakePeer, trace_folder: Path, **settings: object) -> AsyncIterator[Device]:
    """A device tier that forwards everything to `peer`."""
    server = grpc.aio.server()
    handlers = {"Infer": grpc.unary_unary_rpc_method_handler(peer.infer)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = await start_tier(
        TierSettings.with_defaults(
            tier="device", host="127.0.0.1", port=0, next=f"127.0.0.1:{port}", engine="replay",
            traces=str(trace_folder), trace_model="small", plaintext=True, policy="forward-all", **settings,
        )
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(running.address, options=LONG_METADATA) as channel:
            yield Device(running, peer, pb_grpc.TierServiceStub(channel))
    finally:
        peer.answer()  # let hung calls end, so both servers stop at once
        await running.stop(grace=0)
        await server.stop(0)


@dataclass
class Load:
    """What closed-loop clients got, each with the second it came, counted from `started`."""

    started: float = field(default_factory=time.monotonic)
    answers: list[tuple[float, str, bool]] = field(default_factory=list)  # (at, answered_by, degraded)
    errors: list[tuple[float, str]] = field(default_factory=list)

    def answered_by_edge_after(self, at: float) -> float | None:
        return next((t for t, tier, _ in self.answers if t > at and tier == "edge"), None)


async def run_clients(stub: pb_grpc.TierServiceStub, load: Load, *, clients: int, until: float, timeout: float) -> None:
    async def client(number: int) -> None:
        qid = number
        while time.monotonic() - load.started < until:
            qid += clients
            try:
                response = await stub.Infer(quiz(qid % 30), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                load.errors.append((time.monotonic() - load.started, exc.code().name))
                continue
            load.answers.append((time.monotonic() - load.started, response.answered_by, response.degraded))

    await asyncio.gather(*(client(i) for i in range(clients)))


async def seconds_until_open(breaker: CircuitBreaker, since: float, limit: float = 10.0) -> float:
    while breaker.closed and time.monotonic() - since < limit:  # noqa: ASYNC110 - the breaker has no event to wait on
        await asyncio.sleep(0.005)
    return time.monotonic() - since


async def test_a_hung_next_tier_takes_only_its_share_of_slots_and_opens_the_breaker_within_2s(
    trace_folder: Path,
) -> None:
    # 8 slots, of which at most 4 wait on the next tier; 8 clients, so nothing is refused for want of a slot.
    async with device_before(FakePeer(), trace_folder, max_in_flight=8) as device:
        await device.warm_up()
        device.peer.hang()
        load = Load()
        clients = asyncio.ensure_future(run_clients(device.stub, load, clients=8, until=3.0, timeout=10))
        opened_after = await seconds_until_open(device.breaker, load.started)
        await clients
    assert opened_after < 2.0
    assert not load.errors
    # Before the breaker could open (half the 1 s forward timeout), the clients beyond the 4 forwarding slots were
    # already answered here.
    early = [degraded for at, tier, degraded in load.answers if at < 0.4 and tier == "device"]
    assert len(early) > 8
    assert all(early)
    assert all(tier == "device" for _, tier, _ in load.answers)


async def test_a_slow_next_tier_opens_the_breaker_though_every_call_succeeds(trace_folder: Path) -> None:
    # Answers after 0.7 s fit within the 1 s forward timeout (its ceiling, as no latency is known yet), but take
    # more than half of it: slow.
    async with device_before(FakePeer(), trace_folder, forward_timeout=1.0) as device:
        device.peer.answer(delay=0.7)
        slow = await asyncio.gather(*(device.stub.Infer(quiz(qid), timeout=10) for qid in range(3)))
        assert [response.answered_by for response in slow] == ["edge"] * 3
        assert not device.breaker.closed
        asked = time.monotonic()
        response = await device.stub.Infer(quiz(4), timeout=10)
        assert (response.answered_by, response.degraded) == ("device", True)
        assert time.monotonic() - asked < 0.3  # answered here at once, not after another slow call


async def test_a_callers_own_short_deadlines_do_not_open_the_breaker(trace_folder: Path) -> None:
    # The attack as reported: 30 forwarded prompts with a 1.5 ms deadline, then calls with a 60 s deadline. The
    # next tier takes 5 ms, a short network hop. Prompts are sent until 30 forwards were cut short by the caller's
    # deadline (the device then answered them itself, too late for the caller); others end before they are forwarded.
    async with device_before(FakePeer(), trace_folder) as device:
        device.peer.answer(delay=0.005)
        for qid in range(3000):
            if device.degraded_answers >= 30:
                break
            with contextlib.suppress(grpc.aio.AioRpcError):  # they end on their deadline
                await device.stub.Infer(quiz(qid % 30), timeout=0.0015)
        assert device.degraded_answers >= 30
        assert device.breaker.closed
        answers = [await device.stub.Infer(quiz(qid), timeout=60) for qid in range(20)]
        assert not any(response.degraded for response in answers)
        assert {response.answered_by for response in answers} == {"edge"}


async def test_forwards_cut_short_by_the_callers_deadline_do_not_count_against_the_next_tier(
    trace_folder: Path,
) -> None:
    # The same, made certain to reach the next tier: it takes 2 s, the callers give 1 s, so every forward times out
    # on the caller's deadline (90% of it), and the device answers in the time left.
    async with device_before(FakePeer(), trace_folder) as device:
        device.peer.answer(delay=2.0)
        cut_short = await asyncio.gather(*(device.stub.Infer(quiz(qid), timeout=1.0) for qid in range(30)))
        assert all((response.answered_by, response.degraded) == ("device", True) for response in cut_short)
        assert device.breaker.closed
        device.peer.answer()
        response = await device.stub.Infer(quiz(1), timeout=60)
        assert (response.answered_by, response.degraded) == ("edge", False)


async def test_an_invalid_argument_from_the_next_tier_does_not_count_against_it(trace_folder: Path) -> None:
    # A verdict on the request, quoting it at length (20 000 characters, past gRPC's default 16 KB metadata
    # limit, where it used to arrive as RESOURCE_EXHAUSTED "Stream removed" and count as a failure).
    message = "hop name " + "x" * 20_000 + " is too long"
    async with device_before(FakePeer(), trace_folder, breaker_failures=2) as device:
        device.peer.fail(grpc.StatusCode.INVALID_ARGUMENT, message)
        for qid in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await device.stub.Infer(quiz(qid), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert device.breaker.closed
        device.peer.answer()
        response = await device.stub.Infer(quiz(1), timeout=10)
        assert (response.answered_by, response.degraded) == ("edge", False)


async def test_a_probe_answered_with_invalid_argument_leaves_the_next_call_to_probe(trace_folder: Path) -> None:
    async with device_before(FakePeer(), trace_folder, breaker_failures=2, breaker_cooldown=0.2) as device:
        device.peer.fail(grpc.StatusCode.INTERNAL, "broken")
        for qid in range(2):
            assert (await device.stub.Infer(quiz(qid), timeout=10)).degraded
        assert not device.breaker.closed
        device.peer.fail(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        await asyncio.sleep(0.25)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await device.stub.Infer(quiz(3), timeout=10)  # the probe: a verdict on the request, none on the peer
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        device.peer.answer()
        response = await device.stub.Infer(quiz(4), timeout=10)
        assert (response.answered_by, response.degraded) == ("edge", False)
        assert device.breaker.closed


async def test_forwarding_resumes_within_2s_of_a_hung_peers_return(trace_folder: Path) -> None:
    # Callers with 2 s deadlines, so they get degraded answers while the peer hangs, for long enough (6 s) that a
    # backing-off breaker would wait longer than that before its next probe.
    async with device_before(FakePeer(), trace_folder) as device:
        await device.warm_up()
        device.peer.hang()
        load = Load()
        clients = asyncio.ensure_future(run_clients(device.stub, load, clients=4, until=9.0, timeout=2))
        await asyncio.sleep(6.0)
        device.peer.answer()
        back = time.monotonic() - load.started
        await clients
    assert not load.errors
    hung = [degraded for at, tier, degraded in load.answers if 1.0 < at < back and tier == "device"]
    assert len(hung) > 20
    assert all(hung)
    resumed = load.answered_by_edge_after(back)
    assert resumed is not None
    assert resumed - back < 2.0
