"""`recserve gateway` end to end: three real in-process replay tiers on loopback port 0, the gateway on uvicorn in
the same event loop, and the official `openai` SDK as the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from recserve.engines.replay import ReplayEngine
from recserve.server.app import RunningTier, start_tier
from recserve.server.processes import free_port
from recserve.server.settings import TierSettings
from tests.conftest import CHOICE_SYSTEM, GENERATE_SYSTEM, TRACE_MODELS, answer_row, trace_query, write_traces
from tests.grpc.gateway_server import Gateway, running_gateway
from tests.grpc.test_three_tiers import NAMES, Stack, start_stack, stop_stack

QUIZ = {"task": "choice", "options": ["A", "B", "C", "D"], "family": "quiz"}


@pytest.fixture
async def stack(trace_folder: Path) -> AsyncIterator[Stack]:
    stack = await start_stack(trace_folder, window=8)
    yield stack
    await stop_stack(stack)


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[Gateway]:
    async with running_gateway(stack.tiers[0].address) as running:
        yield running


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gateway.client() as client:
        yield client


def quiz_chat(qid: int) -> list[Any]:
    return [{"role": "system", "content": CHOICE_SYSTEM}, {"role": "user", "content": f"quiz question number {qid}?"}]


def chat_prompt(qid: int) -> list[Any]:
    return [{"role": "system", "content": GENERATE_SYSTEM}, {"role": "user", "content": f"chat question number {qid}?"}]


def served(response: Any) -> dict[str, Any]:
    extra: dict[str, Any] = response.model_extra["recserve"]
    return extra


async def test_a_completion_through_the_cascade(client: openai.AsyncOpenAI) -> None:
    raw = await client.completions.with_raw_response.create(
        model="recserve", prompt="chat question number 3?", max_tokens=16, extra_body={"recserve": {"family": "chat"}}
    )
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop"
    answer = served(completion)
    assert answer["answered_by"] in NAMES
    assert answer["hops"][0]["tier"] == "device"
    assert [hop["tier"] for hop in answer["hops"]][-1] == answer["answered_by"]
    assert raw.headers["x-recserve-answered-by"] == answer["answered_by"]
    assert raw.headers["x-recserve-request-id"] == answer["request_id"]
    assert raw.headers["x-recserve-bytes"].startswith("device=")
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_a_choice_through_extra_body(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(
        model="recserve", prompt="quiz question number 5?", extra_body={"recserve": QUIZ | {"request_id": "quiz-5"}}
    )
    answer = served(completion)
    assert answer["chosen_option"] in "ABCD"
    assert answer["request_id"] == "quiz-5"
    assert completion.id == "cmpl-quiz-5"


async def test_a_chat_completion(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="recserve", messages=quiz_chat(7), extra_body={"recserve": QUIZ}, logprobs=True
    )
    assert completion.object == "chat.completion"
    message = completion.choices[0].message
    assert message.role == "assistant"
    assert message.content
    assert served(completion)["chosen_option"] in "ABCD"
    assert completion.choices[0].logprobs is not None


@pytest.mark.parametrize("chat", [True, False])
async def test_streams_come_from_the_tier_that_answered(client: openai.AsyncOpenAI, chat: bool) -> None:
    """Some questions escalate past the device: every chunk of theirs names the tier that answered."""
    answered_by = set()
    for qid in range(12):
        if chat:
            stream: Any = await client.chat.completions.create(
                model="recserve", messages=chat_prompt(qid), stream=True, extra_body={"recserve": {"family": "chat"}},
                stream_options={"include_usage": True},
            )  # fmt: skip
        else:
            stream = await client.completions.create(
                model="recserve", prompt=f"chat question number {qid}?", stream=True,
                extra_body={"recserve": {"family": "chat"}},
            )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        content = [c for c in chunks if c.choices]
        answer = served(chunks[-1])
        assert not answer["degraded"]
        assert {served(c)["tier"] for c in content} == {answer["answered_by"]}
        assert content[-1].choices[0].finish_reason in ("stop", "length")
        text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in content)
        assert text
        if chat:
            assert content[0].choices[0].delta.role == "assistant"
            assert chunks[-1].usage is not None
        answered_by.add(answer["answered_by"])
    assert answered_by - {"device"}, "no question escalated"


async def test_last_tier_offload_goes_straight_to_the_cloud(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(
        model="recserve", prompt="quiz question number 2?", extra_body={"recserve": QUIZ | {"offload": "last_tier"}}
    )
    assert served(completion)["answered_by"] == "cloud"


async def test_models_health_and_metrics(gateway: Gateway, client: openai.AsyncOpenAI) -> None:
    assert [model.id async for model in client.models.list()] == ["recserve"]
    await client.completions.create(model="recserve", prompt="chat question number 1?")
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        assert (await http.get("/health")).status_code == 200
        page = (await http.get("/metrics")).text
    assert 'recserve_gateway_requests_total{endpoint="/v1/completions",status="200"} 1.0' in page
    assert "recserve_gateway_output_tokens_total" in page


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"prompt": "chat question number 1?", "temperature": 5}, "temperature"),
        ({"prompt": "chat question number 1?", "n": 2}, "n must be 1"),
        ({"prompt": ["a", "b"]}, "lists of prompts"),
        ({"prompt": "chat question number 1?", "extra_body": {"recserve": {"bogus": 1}}}, "recserve.bogus"),
        ({"prompt": "a question no trace recorded"}, "no recorded answer"),
        ({"prompt": "chat question number 1?", "max_tokens": 10**6}, "max_tokens 1000000 is out of range"),
    ],
)
async def test_bad_requests_are_400_with_a_readable_message(
    client: openai.AsyncOpenAI, call: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="recserve", **call)
    assert caught.value.status_code == 400
    assert message in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"


async def test_unknown_fields_are_ignored(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        reply = await http.post(
            "/v1/completions", json={"prompt": "chat question number 1?", "presence_penalty": 0.5, "whatever": [1]}
        )
    assert reply.status_code == 200


async def test_an_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=quiz_chat(1))
    assert caught.value.body == {
        "message": "The model `gpt-4o` does not exist.", "type": "invalid_request_error", "code": "model_not_found",
        "param": "model",
    }  # fmt: skip


async def test_api_keys(stack: Stack, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# clients\nfirst-key\nsecond-key\n")
    async with running_gateway(stack.tiers[0].address, api_key_file=str(keys)) as gateway:
        async with gateway.client(api_key="wrong") as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.completions.create(model="recserve", prompt="chat question number 1?")
            assert caught.value.body["code"] == "invalid_api_key"
        async with httpx.AsyncClient(base_url=gateway.base_url) as http:
            assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 401
            assert (await http.get("/health")).status_code == 200
        async with gateway.client(api_key="second-key") as client:
            completion = await client.completions.create(model="recserve", prompt="chat question number 1?")
            assert completion.choices[0].text


async def test_a_full_first_tier_is_429_with_retry_after(stack: Stack, client: openai.AsyncOpenAI) -> None:
    stack.tiers[0].servicer.max_in_flight = 0
    with pytest.raises(openai.RateLimitError) as caught:
        await client.completions.create(model="recserve", prompt="chat question number 1?")
    assert caught.value.response.headers["retry-after"] == "1"


async def test_a_first_tier_that_is_down_is_503() -> None:
    async with running_gateway(f"127.0.0.1:{free_port()}") as gateway:
        async with gateway.client() as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.completions.create(model="recserve", prompt="chat question number 1?")
        assert caught.value.status_code == 503
        async with httpx.AsyncClient(base_url=gateway.base_url) as http:
            assert (await http.get("/health")).status_code == 503


async def test_a_body_over_the_limit_is_413(stack: Stack) -> None:
    async with (
        running_gateway(stack.tiers[0].address, max_body_bytes=2048) as gateway,
        httpx.AsyncClient(base_url=gateway.base_url) as http,
    ):
        reply = await http.post("/v1/completions", json={"prompt": "x" * 4096})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def long_answer_traces(folder: Path) -> Path:
    """A trace whose one chat question the last model answers at length, for streams that take a while."""
    query = trace_query("chat", "test", 0, "answer 0", "tell me a long story?")
    row = answer_row(query, 0, TRACE_MODELS[-1], " ".join(f"word{i}" for i in range(400)), right=True, p=0.9)
    return write_traces(folder, [query], [row])


async def start_slow_tier(trace_folder: Path, delay: float) -> RunningTier:
    """The last tier alone, its replay engine pausing `delay` seconds before each streamed word."""
    settings = TierSettings.with_defaults(
        tier="cloud", host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder),
        trace_model=TRACE_MODELS[-1], plaintext=True,
    )  # fmt: skip
    return await start_tier(settings, engine=ReplayEngine(trace_folder, TRACE_MODELS[-1], delay=delay))


async def test_the_request_timeout_is_504(trace_folder: Path) -> None:
    tier = await start_slow_tier(trace_folder, delay=5)
    try:
        async with running_gateway(tier.address, request_timeout=0.3) as gateway, gateway.client() as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(model="recserve", prompt="chat question number 1?")
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "deadline_exceeded"
    finally:
        await tier.stop(grace=0)


async def test_a_client_that_disconnects_aborts_the_last_tiers_engine(tmp_path: Path) -> None:
    tier = await start_slow_tier(long_answer_traces(tmp_path / "traces"), delay=0.02)
    try:
        async with running_gateway(tier.address) as gateway, gateway.client() as client:
            stream = await client.chat.completions.create(
                model="recserve", messages=[{"role": "user", "content": "tell me a long story?"}], stream=True
            )
            async for chunk in stream:
                assert chunk.choices[0].delta.content == "word0"
                break
            await stream.close()
            engine = tier.tier.engine
            assert isinstance(engine, ReplayEngine)
            for _ in range(100):
                if engine.aborted:
                    break
                await asyncio.sleep(0.05)
            assert engine.aborted == 1
    finally:
        await tier.stop(grace=0)


async def test_mutual_tls_and_a_token_to_the_first_tier(certs: Path, trace_folder: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    ca = str(certs / "recserve-dev-ca.pem")
    settings = TierSettings.with_defaults(
        tier="device", host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder),
        trace_model=TRACE_MODELS[0], tls_cert=str(certs / "device.pem"), tls_key=str(certs / "device.key"),
        tls_client_ca=ca, auth_token_file=str(token_file),
    )  # fmt: skip
    tier = await start_tier(settings)
    mtls = {"ca": ca, "cert": str(certs / "client.pem"), "key": str(certs / "client.key")}
    ask = {"model": "recserve", "prompt": "quiz question number 2?", "extra_body": {"recserve": QUIZ}}
    try:
        async with running_gateway(tier.address, token_file=str(token_file), **mtls) as gateway:
            async with gateway.client() as client:
                assert served(await client.completions.create(**ask))["answered_by"] == "device"
            async with httpx.AsyncClient(base_url=gateway.base_url) as http:
                assert (await http.get("/health")).status_code == 200
        async with running_gateway(tier.address, **mtls) as gateway, gateway.client() as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(**ask)
            assert caught.value.status_code == 502
            assert caught.value.body["code"] == "tier_refused_gateway"
        async with running_gateway(tier.address, ca=ca, token_file=str(token_file)) as gateway:
            async with gateway.client() as client:
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.completions.create(**ask)
            assert caught.value.status_code == 503  # no client certificate: the handshake fails
    finally:
        await tier.stop(grace=0)
