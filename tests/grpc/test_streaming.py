"""InferStream over three real gRPC tiers on loopback: relayed live deltas, bytes, hang-ups and broken streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from recserve.core.engine import EngineError, Generation, GenerationRequest, TextDelta
from recserve.v1 import tier_pb2 as pb
from tests.grpc.test_three_tiers import NAMES, Stack, start_stack, stop_stack
from tests.unit.test_tier_stream import WordEngine, read_into


class BreakingEngine(WordEngine):
    """Streams two words, then fails as a crashed engine would."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        yield TextDelta("half")
        yield TextDelta(" an")
        raise EngineError("the engine process died")


async def word_stack(trace_folder: Path, engines: list[WordEngine], policy: str = "forward-all") -> Stack:
    stack = await start_stack(trace_folder, policy=policy)
    for running, engine in zip(stack.tiers, engines, strict=True):
        running.tier.engine = engine
    return stack


def question(**fields: object) -> pb.InferRequest:
    return pb.InferRequest(prompt="say words", task=pb.TASK_KIND_GENERATE, family="words", **fields)  # type: ignore[arg-type]


async def test_the_answering_tiers_deltas_cross_every_hop_and_the_counters_agree_with_the_hops(
    trace_folder: Path,
) -> None:
    engines = [WordEngine("device"), WordEngine("edge"), WordEngine("alpha beta gamma delta")]
    stack = await word_stack(trace_folder, engines)
    try:
        events = [event async for event in stack.stub.InferStream(question(), timeout=10)]
        deltas = [e.delta for e in events[:-1]]
        final = events[-1].final
        assert "".join(d.text for d in deltas) == "alpha beta gamma delta"
        assert deltas[0].text == "alpha"  # the first word at once; the rest merged within the stream interval
        assert {d.tier for d in deltas} == {"cloud"}
        assert final.answered_by == "cloud"
        assert final.answer == ""
        for index, hop in enumerate(final.hops[:-1]):
            peer = NAMES[index + 1]
            assert hop.bytes_sent > 0
            assert hop.bytes_received > 0
            assert stack.bytes_counted(index, peer, "sent") == hop.bytes_sent
            assert stack.bytes_counted(index, peer, "received") == hop.bytes_received
            # The tier above counts the same link from its side.
            assert stack.bytes_counted(index + 1, NAMES[index], "received") == hop.bytes_sent
            assert stack.bytes_counted(index + 1, NAMES[index], "sent") == hop.bytes_received
    finally:
        await stop_stack(stack)


async def test_a_client_that_hangs_up_mid_stream_makes_the_last_tiers_engine_abort(trace_folder: Path) -> None:
    cloud = WordEngine(" ".join(["word"] * 400), delay=0.01)
    stack = await word_stack(trace_folder, [WordEngine(), WordEngine(), cloud])
    try:
        call = stack.stub.InferStream(question(), timeout=30)
        first = await call.read()
        assert first.delta.tier == "cloud"
        call.cancel()
        for _ in range(200):
            if cloud.aborted:
                break
            await asyncio.sleep(0.01)
        assert cloud.aborted == 1
        assert cloud.finished == 0
        aborted = stack.tiers[2].registry.get_sample_value("recserve_aborted_generations_total", {"tier": "cloud"})
        assert aborted == 1
    finally:
        await stop_stack(stack)


async def test_a_client_that_hangs_up_while_a_lower_tier_generates_makes_that_engine_abort(trace_folder: Path) -> None:
    device = WordEngine(" ".join(["word"] * 400), delay=0.01)
    stack = await word_stack(trace_folder, [device, WordEngine(), WordEngine()], policy="local")
    try:
        call = stack.stub.InferStream(question(offload=pb.OFFLOAD_MODE_LOCAL_ONLY), timeout=30)
        await call.read()
        call.cancel()
        for _ in range(200):
            if device.aborted:
                break
            await asyncio.sleep(0.01)
        assert device.aborted == 1
    finally:
        await stop_stack(stack)


async def test_a_stream_that_breaks_upstream_ends_with_aborted_never_a_short_answer(trace_folder: Path) -> None:
    stack = await word_stack(trace_folder, [WordEngine(), WordEngine(), BreakingEngine()])
    try:
        call = stack.stub.InferStream(question(), timeout=10)
        texts: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_into(call, texts)
        assert texts == ["half", " an"]
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert "incomplete" in (caught.value.details() or "")
    finally:
        await stop_stack(stack)


async def test_a_next_tier_that_is_down_before_the_stream_starts_gets_the_degraded_answer(trace_folder: Path) -> None:
    stack = await word_stack(trace_folder, [WordEngine("device answer"), WordEngine(), WordEngine()])
    try:
        await stack.tiers[1].stop(grace=0)
        events = [event async for event in stack.stub.InferStream(question(), timeout=10)]
        assert [(e.delta.text, e.delta.tier) for e in events[:-1]] == [("device answer", "device")]
        assert events[-1].final.degraded
    finally:
        await stop_stack(stack)


async def test_bad_input_on_a_stream_is_invalid_argument_with_the_message(trace_folder: Path) -> None:
    stack = await word_stack(trace_folder, [WordEngine(), WordEngine(), WordEngine()])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_into(stack.stub.InferStream(pb.InferRequest(prompt=" ", task=pb.TASK_KIND_GENERATE)), [])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt is empty" in (caught.value.details() or "")
        # and the tier keeps serving
        events = [event async for event in stack.stub.InferStream(question(), timeout=10)]
        assert events[-1].final.answered_by == "cloud"
    finally:
        await stop_stack(stack)
