"""Streaming through the tier core (Tier.infer_stream), three tiers linked in process through the wire encoding."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from recserve.core.cascade import link_tiers
from recserve.core.engine import Generation, GenerationRequest, TextDelta
from recserve.core.errors import DeadlineExceeded, InvalidRequest, StreamInterrupted, UpstreamUnavailable
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.core.transport import StreamEvent
from recserve.policies.simple import ForwardAllPolicy, LocalOnlyPolicy, RecServeConfig, RecServePolicy
from recserve.v1 import tier_pb2 as pb
from tests.unit.test_tier import NAMES, cascade, quiz_request, sample


class WordEngine:
    """Answers every prompt with `text`, a word per delta, `delay` seconds apart; counts generations cut short."""

    name = "words"

    def __init__(self, text: str = "one two three four five six", delay: float = 0.0) -> None:
        self.text = text
        self.delay = delay
        self.calls = 0
        self.aborted = 0
        self.finished = 0

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls += 1
        await asyncio.sleep(self.delay * len(self.text.split(" ")))
        return self._generation()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        self.calls += 1
        words = self.text.split(" ")
        done = False
        try:
            for index, word in enumerate(words):
                await asyncio.sleep(self.delay)
                piece = word if index == 0 else " " + word
                yield TextDelta(piece, ((piece, -0.1),))
            done = True
            self.finished += 1
            yield self._generation()
        finally:
            if not done:
                self.aborted += 1

    def _generation(self) -> Generation:
        words = self.text.split(" ")
        tokens = tuple(word if index == 0 else " " + word for index, word in enumerate(words))
        return Generation(
            text=self.text, token_logprobs=(-0.1,) * len(tokens), tokens=tokens, completion_tokens=len(tokens)
        )

    async def healthy(self) -> bool:
        return True

    async def shutdown(self) -> None:
        return None


def word_cascade(engines: Sequence[WordEngine], policies, registry: CollectorRegistry | None = None) -> list[Tier]:
    counter = itertools.count()
    return link_tiers(NAMES, engines, policies, registry=registry, new_request_id=lambda: f"s{next(counter):05d}")


def question(**fields) -> pb.InferRequest:
    return pb.InferRequest(prompt="say six words", task=pb.TASK_KIND_GENERATE, family="words", **fields)


async def collect(events: AsyncIterator[pb.InferStreamResponse]) -> tuple[list[pb.TokenDelta], pb.InferResponse]:
    deltas: list[pb.TokenDelta] = []
    final: pb.InferResponse | None = None
    async for event in events:
        assert final is None, "nothing may follow the final message"
        if event.WhichOneof("event") == "delta":
            deltas.append(event.delta)
        else:
            final = event.final
    assert final is not None
    return deltas, final


async def test_a_streamed_answer_is_the_unary_answer_with_the_same_hops(trace_folder: Path) -> None:
    def policies() -> list[RecServePolicy]:
        return [RecServePolicy(RecServeConfig(window=8)) for _ in range(3)]

    unary, streamed = await cascade(trace_folder, policies()), await cascade(trace_folder, policies())
    answered_by = set()
    for qid in range(30):
        expected = await unary[0].infer(quiz_request(qid))
        deltas, final = await collect(streamed[0].infer_stream(quiz_request(qid)))
        assert "".join(d.text for d in deltas) == expected.answer
        assert {d.tier for d in deltas} == {expected.answered_by}
        assert final.answer == ""
        final.answer = expected.answer
        for streamed_hop, unary_hop in zip(final.hops, expected.hops, strict=True):
            # The links carried other messages (deltas, then a final response without the answer).
            assert (streamed_hop.bytes_sent > 0) == (unary_hop.bytes_sent > 0)
            for hop in (streamed_hop, unary_hop):
                hop.engine_seconds = 0.0  # timed, so never equal
                hop.bytes_sent = hop.bytes_received = 0
        assert final == expected
        answered_by.add(final.answered_by)
    assert len(answered_by) >= 2, "the stream must have been answered by more than one tier"


async def test_an_escalated_stream_relays_the_last_tiers_live_deltas_and_counts_its_bytes() -> None:
    registry = CollectorRegistry()
    engines = [WordEngine("low tier"), WordEngine("mid tier"), WordEngine("a b c d e f g h")]
    tiers = word_cascade(engines, [ForwardAllPolicy(), ForwardAllPolicy(), ForwardAllPolicy()], registry)
    deltas, final = await collect(tiers[0].infer_stream(question(request_id="fixed", sampling={"logprobs": True})))
    # The first word at once, then what the engine made within each stream interval together (here: all the rest).
    assert [d.text for d in deltas] == ["a", " b c d e f g h"]
    assert {d.tier for d in deltas} == {"cloud"}
    assert [lp.token for d in deltas for lp in d.logprobs] == ["a", " b", " c", " d", " e", " f", " g", " h"]
    assert final.answered_by == "cloud"
    assert [h.decision for h in final.hops] == [pb.DECISION_FORWARDED, pb.DECISION_FORWARDED, pb.DECISION_ANSWERED]
    assert [h.answer for h in final.hops] == ["low tier", "mid tier", "a b c d e f g h"]
    device_hop, edge_hop, _ = final.hops

    # What crossed each link, reconstructed: every delta, then the final response as the tier above sent it, before
    # the tiers below filled in their own hops' byte counts.
    def stream_size(unfilled_hops: int) -> int:
        response = pb.InferResponse()
        response.CopyFrom(final)
        for hop in response.hops[:unfilled_hops]:
            hop.bytes_sent = hop.bytes_received = 0
        finals = pb.InferStreamResponse(final=response).ByteSize()
        return sum(pb.InferStreamResponse(delta=d).ByteSize() for d in deltas) + finals

    assert edge_hop.bytes_received == stream_size(unfilled_hops=2)
    assert device_hop.bytes_received == stream_size(unfilled_hops=1)
    assert device_hop.bytes_sent < edge_hop.bytes_sent  # the edge sends one more hop

    def counted(tier: str, peer: str, direction: str) -> float:
        return sample(registry, "recserve_transmitted_bytes_total", tier=tier, peer=peer, direction=direction)

    assert counted("device", "edge", "sent") == device_hop.bytes_sent
    assert counted("device", "edge", "received") == device_hop.bytes_received
    assert counted("edge", "cloud", "sent") == edge_hop.bytes_sent
    assert counted("edge", "cloud", "received") == edge_hop.bytes_received


async def test_a_slow_engine_s_words_go_out_one_by_one_as_they_come() -> None:
    # 150 ms apart, beyond the 100 ms stream interval: each word is a message of its own.
    tiers = word_cascade(
        [WordEngine(), WordEngine(), WordEngine("one two three", delay=0.15)], [ForwardAllPolicy()] * 3
    )
    deltas, _ = await collect(tiers[0].infer_stream(question()))
    assert [d.text for d in deltas] == ["one", " two", " three"]


async def test_a_tier_that_answers_sends_its_whole_answer_in_one_delta() -> None:
    engines = [WordEngine("device words here"), WordEngine(), WordEngine()]
    tiers = word_cascade(engines, [LocalOnlyPolicy(), ForwardAllPolicy(), ForwardAllPolicy()])
    deltas, final = await collect(tiers[0].infer_stream(question()))
    assert [(d.text, d.tier) for d in deltas] == [("device words here", "device")]
    assert final.answered_by == "device"
    assert engines[1].calls == engines[2].calls == 0


async def test_a_client_that_hangs_up_aborts_the_generating_engine() -> None:
    engines = [WordEngine(), WordEngine(), WordEngine(" ".join(["word"] * 200), delay=0.01)]
    tiers = word_cascade(engines, [ForwardAllPolicy(), ForwardAllPolicy(), ForwardAllPolicy()])
    events = tiers[0].infer_stream(question())
    first = await anext(events)
    assert first.delta.tier == "cloud"
    await events.aclose()
    assert engines[2].aborted == 1
    assert engines[2].finished == 0


async def read_into(events: AsyncIterator[pb.InferStreamResponse], texts: list[str]) -> None:
    async for event in events:
        texts.append(event.delta.text)


class FailingUpstream:
    """A next tier whose stream sends `deltas` deltas, then fails."""

    def __init__(self, deltas: int) -> None:
        self.deltas = deltas

    async def infer_stream(
        self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        for _ in range(self.deltas):
            event = pb.InferStreamResponse(delta=pb.TokenDelta(text="part ", tier="edge"))
            yield StreamEvent(event, event.ByteSize())
        raise UpstreamUnavailable("next tier at edge failed: UNAVAILABLE: connection reset")

    async def infer(self, request, timeout, *, wait_for_ready=False):  # pragma: no cover - streams only here
        raise NotImplementedError

    async def feedback(self, request, timeout):  # pragma: no cover
        raise NotImplementedError

    async def close(self) -> None:
        return None


def tier_over(upstream: FailingUpstream, engine: WordEngine, registry: CollectorRegistry | None = None) -> Tier:
    metrics = TierMetrics.standalone(registry or CollectorRegistry(), "device")
    return Tier("device", engine, ForwardAllPolicy(), metrics, upstream)  # type: ignore[arg-type]


async def test_a_next_tier_failing_before_its_first_event_gets_the_degraded_local_answer() -> None:
    tier = tier_over(FailingUpstream(deltas=0), WordEngine("local answer"))
    deltas, final = await collect(tier.infer_stream(question()))
    assert [(d.text, d.tier) for d in deltas] == [("local answer", "device")]
    assert final.degraded
    assert final.hops[0].decision == pb.DECISION_DEGRADED


async def test_a_next_tier_failing_mid_stream_ends_the_stream_with_an_error_never_a_short_answer() -> None:
    registry = CollectorRegistry()
    tier = tier_over(FailingUpstream(deltas=2), WordEngine("local answer"), registry)
    received: list[str] = []
    with pytest.raises(StreamInterrupted, match=r"after 2 parts of its answer .* incomplete"):
        await read_into(tier.infer_stream(question()), received)
    assert received == ["part ", "part "]
    assert sample(registry, "recserve_requests_total", tier="device", outcome="error") == 1


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_tiers_linked_in_process_wait_for_a_next_tier_that_stalls(streamed: bool) -> None:
    # Over gRPC, 3 times the next tier's p99 latency (at least 1 s) bounds a forward once 20 have been timed. In one
    # process (the offline replay) a stall is the machine's, not the next tier's, and must not change the answer.
    edge = WordEngine("edge answer")
    tiers = word_cascade(
        [WordEngine("device"), edge, WordEngine("cloud answer")],
        [ForwardAllPolicy(), LocalOnlyPolicy(), LocalOnlyPolicy()],
    )
    for _ in range(25):
        await tiers[0].infer(question())
    edge.delay = 0.6  # a second and a fifth for its two words
    if streamed:
        deltas, response = await collect(tiers[0].infer_stream(question()))
        answer = "".join(delta.text for delta in deltas)
    else:
        response = await tiers[0].infer(question())
        answer = response.answer
    assert (response.answered_by, answer) == ("edge", "edge answer")
    assert [hop.decision for hop in response.hops] == [pb.DECISION_FORWARDED, pb.DECISION_ANSWERED]


@pytest.mark.parametrize("offload", [pb.OFFLOAD_MODE_AUTO, pb.OFFLOAD_MODE_LOCAL_ONLY], ids=["whole", "live"])
async def test_the_deadline_holds_on_a_stream(offload: int) -> None:
    tiers = word_cascade([WordEngine(delay=0.1)] * 3, [LocalOnlyPolicy(), LocalOnlyPolicy(), LocalOnlyPolicy()])
    with pytest.raises(DeadlineExceeded):
        await collect(tiers[0].infer_stream(question(offload=offload), timeout=0.3))


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_a_request_for_the_last_tier_passes_the_tiers_below_without_their_engines(streamed: bool) -> None:
    engines = [WordEngine("device"), WordEngine("edge"), WordEngine("cloud answer")]
    tiers = word_cascade(engines, [LocalOnlyPolicy(), LocalOnlyPolicy(), LocalOnlyPolicy()])
    request = question(offload=pb.OFFLOAD_MODE_LAST_TIER)
    if streamed:
        deltas, final = await collect(tiers[0].infer_stream(request))
        assert "".join(d.text for d in deltas) == "cloud answer"
    else:
        final = await tiers[0].infer(request)
        assert final.answer == "cloud answer"
    assert final.answered_by == "cloud"
    assert [h.decision for h in final.hops] == [pb.DECISION_FORWARDED, pb.DECISION_FORWARDED, pb.DECISION_ANSWERED]
    assert engines[0].calls == engines[1].calls == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "either `prompt`"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
        ({"messages": [{"role": "system", "content": "be brief"}]}, "no user turn"),
    ],
)
async def test_bad_chat_messages_are_rejected_with_a_clear_message(fields: dict, message: str) -> None:
    tiers = word_cascade([WordEngine()] * 3, [LocalOnlyPolicy(), LocalOnlyPolicy(), LocalOnlyPolicy()])
    request = pb.InferRequest(task=pb.TASK_KIND_GENERATE, **fields)
    with pytest.raises(InvalidRequest, match=message):
        await tiers[0].infer(request)
    with pytest.raises(InvalidRequest, match=message):
        await collect(tiers[0].infer_stream(request))


async def test_chat_messages_reach_the_engine() -> None:
    seen: list[GenerationRequest] = []

    class Recording(WordEngine):
        async def generate(self, request: GenerationRequest) -> Generation:
            seen.append(request)
            return await super().generate(request)

    tiers = word_cascade([Recording()] * 3, [LocalOnlyPolicy(), LocalOnlyPolicy(), LocalOnlyPolicy()])
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    await tiers[0].infer(pb.InferRequest(task=pb.TASK_KIND_GENERATE, messages=turns))
    assert [(m.role, m.content) for m in seen[0].messages] == [("system", "be brief"), ("user", "hi")]
    assert seen[0].prompt == ""
