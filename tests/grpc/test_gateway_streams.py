"""The gateway's streams and error mapping against a scripted TierService (a fake first tier on loopback port 0),
through the official `openai` SDK: chunk format, held-back finish reason, the `recserve` object, errors before
and during a stream, and the gRPC call cancelled when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import openai
import pytest

from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.grpc.gateway_server import Gateway, running_gateway


def final(answer: str = "", *, tier: str = "cloud", tokens: int = 3, finish: str = "stop") -> pb.InferResponse:
    hops = [
        pb.Hop(tier="device", decision=pb.DECISION_FORWARDED, confidence=0.2, threshold=0.5, bytes_sent=100,
               bytes_received=200),
        pb.Hop(tier=tier, decision=pb.DECISION_ANSWERED, confidence=0.9, threshold=0.0),
    ]  # fmt: skip
    return pb.InferResponse(
        answer=answer, answered_by=tier, confidence=pb.Confidence(value=0.9), hops=hops,
        usage=pb.Usage(prompt_tokens=5, completion_tokens=tokens), finish_reason=finish,
        logprobs=[pb.TokenLogprob(token=t, logprob=-0.5) for t in answer.split()],
    )  # fmt: skip


class ScriptedTier(pb_grpc.TierServiceServicer):
    """Answers by prompt (or the last chat turn): "words N" streams N words; "fail" fails after two words; "slow"
    sends one word and then waits to be cancelled; "busy" and "bad" refuse at once."""

    def __init__(self) -> None:
        self.requests: list[pb.InferRequest] = []
        self.cancelled = asyncio.Event()

    async def _hang(self) -> None:
        """Wait until the call is cancelled, and say so."""
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    @staticmethod
    def _prompt(request: pb.InferRequest) -> str:
        return request.messages[-1].content if request.messages else request.prompt

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        self.requests.append(request)
        prompt = self._prompt(request)
        if prompt == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "tier device is serving its limit")
        if prompt == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
        if prompt == "slow":
            await self._hang()
        response = final("a b c")
        response.request_id = request.request_id
        return response

    async def InferStream(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferStreamResponse]:
        self.requests.append(request)
        prompt = self._prompt(request)
        if prompt in ("busy", "bad"):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if prompt == "busy" else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, f"refused: {prompt}")
        words = int(prompt.split()[1]) if prompt.startswith("words") else 2
        logprobs = request.sampling.logprobs
        for i in range(words):
            token = pb.TokenLogprob(token=f"w{i} ", logprob=-0.25)
            yield pb.InferStreamResponse(
                delta=pb.TokenDelta(text=f"w{i} ", tier="cloud", logprobs=[token] if logprobs else [])
            )
        if prompt == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud went away")
        if prompt == "slow":
            await self._hang()
        done = final(tokens=words, finish="length" if prompt == "words 4" else "stop")
        done.request_id = request.request_id
        yield pb.InferStreamResponse(final=done)


@pytest.fixture
async def tier() -> AsyncIterator[tuple[ScriptedTier, str]]:
    server = grpc.aio.server()
    scripted = ScriptedTier()
    pb_grpc.add_TierServiceServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield scripted, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def gateway(tier: tuple[ScriptedTier, str]) -> AsyncIterator[Gateway]:
    async with running_gateway(tier[1]) as running:
        yield running


async def test_a_chat_stream_in_openai_chunks(gateway: Gateway, tier: tuple[ScriptedTier, str]) -> None:
    async with gateway.client() as client:
        stream = await client.chat.completions.create(
            model="recserve", messages=[{"role": "user", "content": "words 3"}], stream=True, logprobs=True,
            stream_options={"include_usage": True}, extra_body={"recserve": {"request_id": "r-1"}},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == "w0 w1 w2 "
    assert content[0].choices[0].delta.role == "assistant"
    # Each delta as it comes, then an empty one with the finish reason, as OpenAI's API ends a stream.
    assert [c.choices[0].finish_reason for c in content] == [None, None, None, "stop"]
    assert content[-1].choices[0].delta.content is None
    assert all(c.model_extra["recserve"]["tier"] == "cloud" for c in content)
    assert all(c.id == "chatcmpl-r-1" and c.object == "chat.completion.chunk" for c in chunks)
    assert [t.logprob for c in content for t in c.choices[0].logprobs.content] == [-0.25] * 3
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 3
    served = usage_chunk.model_extra["recserve"]
    assert served["answered_by"] == "cloud"
    assert served["request_id"] == "r-1"
    assert [hop["decision"] for hop in served["hops"]] == ["forwarded", "answered"]
    assert tier[0].requests[-1].request_id == "r-1"
    labels = {"endpoint": "/v1/chat/completions"}
    assert gateway.registry.get_sample_value("recserve_gateway_time_to_first_token_seconds_count", labels) == 1
    assert gateway.registry.get_sample_value("recserve_gateway_stream_tokens_per_second_count", labels) == 1
    assert gateway.registry.get_sample_value("recserve_gateway_output_tokens_total", labels) == 3
    assert [(m.role, m.content) for m in tier[0].requests[-1].messages] == [("user", "words 3")]


async def test_a_completion_stream_ends_with_the_recserve_object(gateway: Gateway) -> None:
    async with gateway.client() as client:
        stream = await client.completions.create(model="recserve", prompt="words 4", stream=True, logprobs=1)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == "w0 w1 w2 w3 "
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["recserve"]["answered_by"] == "cloud"
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 3, 6, 9]
    assert chunks[0].choices[0].logprobs.top_logprobs == [{"w0 ": -0.25}]


async def test_the_stream_headers_carry_the_request_id(gateway: Gateway) -> None:
    async with gateway.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="recserve", messages=[{"role": "user", "content": "words 1"}], stream=True,
        )  # fmt: skip
        request_id = raw.headers["x-recserve-request-id"]
        chunks = [chunk async for chunk in raw.parse()]
    assert len(request_id) == 32
    assert chunks[-1].model_extra["recserve"]["request_id"] == request_id


async def test_an_error_mid_stream_is_an_error_event_not_a_truncated_stream(gateway: Gateway) -> None:
    async with gateway.client() as client:
        stream = await client.chat.completions.create(
            model="recserve", messages=[{"role": "user", "content": "fail"}], stream=True
        )
        texts: list[str | None] = []

        async def read_all() -> None:
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content)

        with pytest.raises(openai.APIError) as caught:
            await read_all()
    assert texts == ["w0 ", "w1 "]
    assert "the cloud went away" in caught.value.message
    assert caught.value.body["code"] == "tier_unavailable"
    # On the wire: the error event, then [DONE].
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        reply = await http.post("/v1/completions", json={"prompt": "fail", "stream": True})
    events = [line for line in reply.text.split("\n\n") if line]
    assert events[-2].startswith('data: {"error":')
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize(("prompt", "status", "error"), [("busy", 429, openai.RateLimitError),
                                                         ("bad", 400, openai.BadRequestError)])  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
async def test_a_refusal_before_the_first_token_keeps_its_status(
    gateway: Gateway, prompt: str, status: int, error: type[openai.APIStatusError], stream: bool
) -> None:
    async with gateway.client() as client:
        with pytest.raises(error) as caught:
            await client.completions.create(model="recserve", prompt=prompt, stream=stream)
    assert caught.value.status_code == status
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"


async def test_a_client_that_goes_away_cancels_the_tiers_call(gateway: Gateway, tier: tuple[ScriptedTier, str]) -> None:
    async with gateway.client() as client:
        stream = await client.chat.completions.create(
            model="recserve", messages=[{"role": "user", "content": "slow"}], stream=True
        )
        async for chunk in stream:
            assert chunk.choices[0].delta.content == "w0 "
            break
        await stream.close()
    await asyncio.wait_for(tier[0].cancelled.wait(), 5)


async def test_a_client_that_gives_up_on_a_plain_request_cancels_the_tiers_call(
    gateway: Gateway, tier: tuple[ScriptedTier, str]
) -> None:
    async with gateway.client(timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.completions.create(model="recserve", prompt="slow")
    await asyncio.wait_for(tier[0].cancelled.wait(), 5)
    for _ in range(50):
        if gateway.registry.get_sample_value(
            "recserve_gateway_requests_total", {"endpoint": "/v1/completions", "status": "499"}
        ):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the abandoned request was not counted as 499")


async def test_the_deadline_is_the_request_timeout(tier: tuple[ScriptedTier, str]) -> None:
    async with running_gateway(tier[1], request_timeout=0.3) as gateway, gateway.client() as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model="recserve", prompt="slow")
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "deadline_exceeded"


async def test_headers_and_metrics_of_a_plain_response(gateway: Gateway) -> None:
    async with gateway.client() as client:
        raw = await client.completions.with_raw_response.create(model="recserve", prompt="hello")
        completion = raw.parse()
    assert completion.choices[0].text == "a b c"
    assert raw.headers["x-recserve-answered-by"] == "cloud"
    assert raw.headers["x-recserve-degraded"] == "false"
    assert raw.headers["x-recserve-confidence"] == "0.9"
    assert raw.headers["x-recserve-bytes"] == "device=100/200,cloud=0/0"
    assert completion.model_extra["recserve"]["request_id"] == raw.headers["x-recserve-request-id"]
    value = gateway.registry.get_sample_value
    assert value("recserve_gateway_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 1
    assert value("recserve_gateway_output_tokens_total", {"endpoint": "/v1/completions"}) == 3
