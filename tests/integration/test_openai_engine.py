"""The openai engine against a real OpenAI-compatible server on loopback: vLLM's, on the tiny edge model."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from recserve.core.confidence import score_perplexity
from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta
from recserve.core.sketch import SketchParseError, parse_sketch, sketch_request
from recserve.engines.llama_cpp import LlamaCppEngine
from recserve.engines.openai import CHOICE_TOP_LOGPROBS, OpenAIEngine
from recserve.server.app import start_tier
from recserve.server.processes import free_port
from recserve.server.settings import TierSettings
from recserve.tools.models import TinyModelPaths
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

API_KEY = "test-key"
SERVED_NAME = "tiny-edge"
# vLLM's server (float32) against llama.cpp with a float32 KV cache on the same weights.
PARITY_TOLERANCE = 1e-4
CHAT = (ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?"))


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, TinyModelPaths], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on 127.0.0.1; yields its base URL once it lists its model."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = os.environ | {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
             "--model", str(tiny_models["edge"].hf_dir), "--served-model-name", SERVED_NAME, "--api-key", API_KEY,
             "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
             "--kv-cache-memory-bytes", str(1 << 30)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            _wait_until_up(base_url, proc, log_path, timeout=600)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(base_url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the vLLM server was not up after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(server: str) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(server, api_key=API_KEY, timeout=60)
    await engine.start()
    yield engine
    await engine.shutdown()
    assert not await engine.healthy()


async def test_the_server_generates_what_llama_cpp_does_on_the_same_weights(
    engine: OpenAIEngine, llama_engine: LlamaCppEngine
) -> None:
    assert engine.model == SERVED_NAME  # none named: the server's first model
    assert await engine.healthy()
    for prompt in ("The answer is", "What is the capital of France?"):
        request = GenerationRequest(prompt=prompt, system_prompt="Answer briefly.", max_tokens=12)
        ours, reference = await engine.generate(request), await llama_engine.generate(request)
        assert ours.text == reference.text
        assert ours.completion_tokens == reference.completion_tokens == len(ours.token_logprobs)
        assert ours.prompt_tokens == reference.prompt_tokens
        assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
        assert [n for n, _ in ours.first_top_logprobs] == [n for n, _ in reference.first_top_logprobs]
        assert ours.metadata["finish_reason"] == "length"


async def test_the_server_follows_a_grammar_as_llama_cpp_does(
    engine: OpenAIEngine, llama_engine: LlamaCppEngine
) -> None:
    for question in ("What is the capital of France?", "Why is the sky blue?"):
        request = sketch_request(question, 5)
        ours, reference = await engine.generate(request), await llama_engine.generate(request)
        assert ours.text == reference.text
        assert parse_sketch(ours.text, 5) == parse_sketch(reference.text, 5)
        assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
        unconstrained = await engine.generate(dataclasses.replace(request, grammar=""))
        with pytest.raises(SketchParseError):
            parse_sketch(unconstrained.text, 5)


async def test_choice_options_are_read_from_the_top_logprobs_or_bounded(
    engine: OpenAIEngine, llama_engine: LlamaCppEngine
) -> None:
    base = GenerationRequest(
        prompt="Which letter comes first? A) x B) y", max_tokens=1, top_logprobs=CHOICE_TOP_LOGPROBS
    )
    reference = await llama_engine.generate(base)
    present = tuple(name for name, _ in reference.first_top_logprobs[:3])
    found = await engine.generate(GenerationRequest(prompt=base.prompt, max_tokens=1, options=present))
    assert found.option_logprobs == pytest.approx(
        [lp for _, lp in reference.first_top_logprobs[:3]], abs=PARITY_TOLERANCE, rel=0
    )
    # The random tiny model ranks the letters below its top 20: each gets the same bounding estimate.
    letters = await engine.generate(GenerationRequest(prompt=base.prompt, max_tokens=1, options=("A", "B", "C", "D")))
    least = reference.first_top_logprobs[-1][1]
    assert len(set(letters.option_logprobs)) == 1
    assert all(math.isfinite(lp) and lp <= least + PARITY_TOLERANCE for lp in letters.option_logprobs)


async def test_a_tier_scores_the_servers_answers_with_its_own_confidence(engine: OpenAIEngine) -> None:
    settings = TierSettings.with_defaults(
        tier="edge", engine="openai", base_url=engine.base_url, api_key=API_KEY, host="127.0.0.1", port=0,
        plaintext=True,
    )  # fmt: skip
    running = await start_tier(settings)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            response = await pb_grpc.TierServiceStub(channel).Infer(
                pb.InferRequest(
                    prompt="The answer is", task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=8)
                ),
                timeout=60,
            )
    finally:
        await running.stop(grace=1)
    direct = await engine.generate(GenerationRequest(prompt="The answer is", max_tokens=8))
    assert response.answer == direct.text
    assert response.answered_by == "edge"
    assert response.confidence.value == pytest.approx(score_perplexity(direct).value, abs=1e-9)


async def test_a_wrong_key_or_model_fails_start_with_a_clear_message(server: str) -> None:
    with pytest.raises(EngineError, match="401"):
        await OpenAIEngine(server, api_key="wrong", timeout=10).start()
    with pytest.raises(EngineError, match="does not serve 'other-model'"):
        await OpenAIEngine(server, api_key=API_KEY, model="other-model", timeout=10).start()


async def stream_events(engine: OpenAIEngine, request: GenerationRequest) -> tuple[list[TextDelta], Generation]:
    """A stream's deltas and its final Generation, checking that the Generation comes once and last."""
    events = [event async for event in engine.stream(request)]
    final = events.pop()
    assert isinstance(final, Generation)
    assert all(isinstance(event, TextDelta) for event in events)
    return events, final  # type: ignore[return-value]


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt="The answer is", system_prompt="Answer briefly.", max_tokens=12),
        GenerationRequest(messages=CHAT, max_tokens=12),
        GenerationRequest(messages=CHAT, max_tokens=2, options=("A", "B"), top_logprobs=3),
    ],
    ids=["prompt", "chat", "chat-choice"],
)
async def test_stream_adds_up_to_what_generate_returns(engine: OpenAIEngine, request_: GenerationRequest) -> None:
    aborted = engine.aborted
    deltas, streamed = await stream_events(engine, request_)
    final = await engine.generate(request_)
    assert "".join(delta.text for delta in deltas) == streamed.text == final.text
    assert streamed.tokens == final.tokens
    assert len(final.tokens) == final.completion_tokens == streamed.completion_tokens
    assert streamed.prompt_tokens == final.prompt_tokens > 0
    assert streamed.token_logprobs == pytest.approx(final.token_logprobs, abs=1e-5, rel=0)
    assert [token for delta in deltas for token in delta.tokens] == list(
        zip(streamed.tokens, streamed.token_logprobs, strict=True)
    )
    assert [n for n, _ in streamed.first_top_logprobs] == [n for n, _ in final.first_top_logprobs]
    assert streamed.option_logprobs == pytest.approx(final.option_logprobs, abs=1e-5, rel=0)
    assert streamed.finish_reason == final.finish_reason == "length"
    assert engine.aborted == aborted


async def test_chat_completions_generate_what_llama_cpp_does_on_the_same_template(
    engine: OpenAIEngine, llama_engine: LlamaCppEngine
) -> None:
    request = GenerationRequest(messages=CHAT, max_tokens=12, top_logprobs=3)
    ours, reference = await engine.generate(request), await llama_engine.generate(request)
    assert ours.text == reference.text
    assert ours.prompt_tokens == reference.prompt_tokens
    assert ours.completion_tokens == reference.completion_tokens == len(ours.token_logprobs)
    assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
    assert [n for n, _ in ours.first_top_logprobs] == [n for n, _ in reference.first_top_logprobs]


async def test_stop_strings_never_leak_into_streamed_text(engine: OpenAIEngine) -> None:
    full = await engine.generate(GenerationRequest(prompt="The answer is", max_tokens=32))
    stop = full.text[6:10]
    deltas, final = await stream_events(engine, GenerationRequest(prompt="The answer is", max_tokens=32, stop=(stop,)))
    assert final.text == full.text[: full.text.index(stop)]
    assert final.finish_reason == "stop"
    shown = ""
    for delta in deltas:
        shown += delta.text
        assert final.text.startswith(shown)
    assert shown == final.text


async def test_closing_a_stream_counts_an_abort_and_the_server_goes_on(engine: OpenAIEngine) -> None:
    aborted = engine.aborted
    stream = engine.stream(GenerationRequest(prompt="one two", max_tokens=400))
    assert isinstance(await anext(stream), TextDelta)
    await stream.aclose()
    assert engine.aborted == aborted + 1
    follow = await engine.generate(GenerationRequest(prompt="one two", max_tokens=3))
    assert follow.completion_tokens == 3
