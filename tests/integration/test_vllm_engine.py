"""vLLM engine on the generated tiny models: same tokens and log-probs as llama.cpp on the same weights, batching."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from recserve.core.confidence import score_choice, score_perplexity
from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.engines.llama_cpp import LlamaCppEngine
from recserve.engines.vllm import VllmEngine
from recserve.tools.models import TinyModelPaths

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

# vLLM (float32, CPU) against llama.cpp with a float32 KV cache, same weights: measured differences are ~5e-6.
# With llama.cpp's default float16 KV cache they grow to ~5e-3, so the parity runs use the float32 cache.
PARITY_TOLERANCE = 1e-4
GREEDY_PROMPTS = ("The answer is", "What is the capital of France?", "one two three")
OPTIONS = ("A", "B", "C", "D")
CHAT = (ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?"))
CHOICE = GenerationRequest(
    prompt="Which letter comes first? A) x B) y C) z D) w",
    system_prompt="Answer with A, B, C or D.",
    max_tokens=1,
    options=OPTIONS,
    top_logprobs=3,
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(tiny_models: dict[str, TinyModelPaths]) -> AsyncIterator[VllmEngine]:
    engine = create_engine("vllm", EngineConfig(model=str(tiny_models["edge"].hf_dir), context_length=512))
    assert isinstance(engine, VllmEngine)
    assert not await engine.healthy()
    await engine.start()
    assert await engine.healthy()
    yield engine
    await engine.shutdown()
    assert not await engine.healthy()
    with pytest.raises(EngineError, match="not started"):
        await engine.generate(GenerationRequest(prompt="hello", max_tokens=1))


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
async def test_greedy_tokens_and_logprobs_match_llama_cpp(
    vllm_engine: VllmEngine, llama_engine: LlamaCppEngine, prompt: str
) -> None:
    request = GenerationRequest(prompt=prompt, max_tokens=16)
    ours, reference = await vllm_engine.generate(request), await llama_engine.generate(request)
    assert ours.text == reference.text
    assert ours.completion_tokens == reference.completion_tokens == len(ours.token_logprobs) > 0
    assert ours.prompt_tokens == reference.prompt_tokens
    assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
    assert [name for name, _ in ours.first_top_logprobs] == [name for name, _ in reference.first_top_logprobs]
    assert [lp for _, lp in ours.first_top_logprobs] == pytest.approx(
        [lp for _, lp in reference.first_top_logprobs], abs=PARITY_TOLERANCE, rel=0
    )
    assert all(isinstance(lp, float) for lp in ours.token_logprobs)
    assert score_perplexity(ours).value == pytest.approx(score_perplexity(reference).value, abs=PARITY_TOLERANCE)


async def test_choice_option_logprobs_are_exact_even_outside_the_top_logprobs(
    vllm_engine: VllmEngine, llama_engine: LlamaCppEngine
) -> None:
    ours, reference = await vllm_engine.generate(CHOICE), await llama_engine.generate(CHOICE)
    # The random tiny model ranks these letters far down: every option needed its own prompt_logprobs request.
    assert ours.metadata["option_logprob_requests"] == "4"
    assert ours.option_logprobs == pytest.approx(reference.option_logprobs, abs=PARITY_TOLERANCE, rel=0)
    assert len(set(ours.option_logprobs)) == 4
    assert sum(math.exp(lp) for lp in ours.option_logprobs) <= 1.0
    assert score_choice(ours, OPTIONS).chosen_option == score_choice(reference, OPTIONS).chosen_option
    assert score_choice(ours, OPTIONS).value == pytest.approx(score_choice(reference, OPTIONS).value, abs=1e-4)
    # Asking for no tokens still scores the options.
    bare = await vllm_engine.generate(dataclasses.replace(CHOICE, max_tokens=0))
    assert bare.option_logprobs == pytest.approx(ours.option_logprobs, abs=1e-5, rel=0)


async def test_options_among_the_top_logprobs_need_no_extra_request(vllm_engine: VllmEngine) -> None:
    probe = await vllm_engine.generate(dataclasses.replace(CHOICE, options=(), top_logprobs=4))
    options = tuple(name for name, _ in probe.first_top_logprobs if name.strip())[:3]
    assert len(options) >= 2
    generation = await vllm_engine.generate(dataclasses.replace(CHOICE, options=options))
    assert generation.metadata["option_logprob_requests"] == "0"
    expected = dict(probe.first_top_logprobs)
    assert generation.option_logprobs == pytest.approx([expected[o] for o in options], abs=1e-5, rel=0)


async def test_concurrent_requests_are_batched_by_vllm(vllm_engine: VllmEngine) -> None:
    requests = [GenerationRequest(prompt=f"{n} two three", max_tokens=24) for n in range(8)]
    alone = [await vllm_engine.generate(r) for r in requests]
    in_flight: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            in_flight.append(vllm_engine._engine.get_num_unfinished_requests())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(*(vllm_engine.generate(r) for r in requests))
    done.set()
    await watcher
    # The tier does not serialise: vLLM holds several requests at once and batches them.
    assert max(in_flight) >= 4
    for single, batched in zip(alone, together, strict=True):
        assert batched.text == single.text
        assert batched.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-5, rel=0)


async def test_stop_strings_and_limits(vllm_engine: VllmEngine) -> None:
    full = await vllm_engine.generate(GenerationRequest(prompt="The answer is", max_tokens=16))
    assert full.metadata["finish_reason"] == "length"
    stop = full.text.strip()[3:5]
    assert stop.strip()
    cut = await vllm_engine.generate(GenerationRequest(prompt="The answer is", max_tokens=16, stop=(stop,)))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.metadata["finish_reason"] == "stop"
    assert cut.token_logprobs == pytest.approx(full.token_logprobs[: cut.completion_tokens], abs=1e-5, rel=0)
    with pytest.raises(EngineError, match="does not fit the context of 512"):
        await vllm_engine.generate(GenerationRequest(prompt="one two " * 400, max_tokens=4))


async def test_sampling_with_temperature_reports_model_logprobs(vllm_engine: VllmEngine) -> None:
    generation = await vllm_engine.generate(GenerationRequest(prompt="The answer is", max_tokens=8, temperature=1.0))
    assert generation.completion_tokens == len(generation.token_logprobs) > 0
    assert all(math.isfinite(lp) and lp <= 0 for lp in generation.token_logprobs)


async def stream_events(engine: VllmEngine, request: GenerationRequest) -> tuple[list[TextDelta], Generation]:
    """A stream's deltas and its final Generation, checking that the Generation comes once and last."""
    events = [event async for event in engine.stream(request)]
    final = events.pop()
    assert isinstance(final, Generation)
    assert all(isinstance(event, TextDelta) for event in events)
    return events, final  # type: ignore[return-value]


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt="The answer is", max_tokens=16),
        GenerationRequest(messages=CHAT, max_tokens=16),
        dataclasses.replace(CHOICE, max_tokens=4),
    ],
    ids=["prompt", "chat", "choice"],
)
async def test_stream_adds_up_to_what_generate_returns(vllm_engine: VllmEngine, request_: GenerationRequest) -> None:
    aborted = vllm_engine.aborted
    deltas, streamed = await stream_events(vllm_engine, request_)
    final = await vllm_engine.generate(request_)
    assert len(deltas) > 1
    assert "".join(delta.text for delta in deltas) == streamed.text == final.text
    assert streamed.tokens == final.tokens
    assert len(final.tokens) == final.completion_tokens == streamed.completion_tokens
    assert streamed.token_logprobs == pytest.approx(final.token_logprobs, abs=1e-5, rel=0)
    streamed_tokens = [token for delta in deltas for token in delta.tokens]
    assert [name for name, _ in streamed_tokens] == list(streamed.tokens)
    assert [lp for _, lp in streamed_tokens] == list(streamed.token_logprobs)
    assert streamed.option_logprobs == pytest.approx(final.option_logprobs, abs=1e-5, rel=0)
    assert streamed.finish_reason == final.finish_reason == "length"
    assert vllm_engine.aborted == aborted


async def test_chat_is_rendered_and_generated_as_llama_cpp_does(
    vllm_engine: VllmEngine, llama_engine: LlamaCppEngine
) -> None:
    # Both render the same template (the HF folder's and the GGUF's) to the same prompt tokens, one BOS.
    ids = vllm_engine._prompt_ids(GenerationRequest(messages=CHAT))
    assert ids == llama_engine._prompt_tokens(llama_engine._llm, GenerationRequest(messages=CHAT))
    assert vllm_engine.render_chat(CHAT) == llama_engine.render_chat(CHAT)
    assert ids.count(vllm_engine._tokenizer.bos_token_id) == 1
    request = GenerationRequest(messages=CHAT, max_tokens=12)
    ours, reference = await vllm_engine.generate(request), await llama_engine.generate(request)
    assert ours.text == reference.text
    assert ours.tokens == reference.tokens
    assert ours.prompt_tokens == reference.prompt_tokens == len(ids)
    assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
    # CHOICE over a chat: the option log-probs of the first position after the template.
    choice = dataclasses.replace(CHOICE, prompt="", system_prompt="", messages=CHAT)
    ours, reference = await vllm_engine.generate(choice), await llama_engine.generate(choice)
    assert ours.option_logprobs == pytest.approx(reference.option_logprobs, abs=PARITY_TOLERANCE, rel=0)


async def test_stop_strings_never_leak_into_streamed_text(vllm_engine: VllmEngine) -> None:
    full = await vllm_engine.generate(GenerationRequest(prompt="The answer is", max_tokens=32))
    for start in (3, 10):
        stop = full.text[start : start + 4]
        deltas, final = await stream_events(
            vllm_engine, GenerationRequest(prompt="The answer is", max_tokens=32, stop=(stop,))
        )
        assert final.text == full.text[: full.text.index(stop)]
        assert final.finish_reason == "stop"
        shown = ""
        for delta in deltas:
            shown += delta.text
            assert final.text.startswith(shown)
        assert shown == final.text


async def test_closing_a_stream_aborts_the_vllm_request(vllm_engine: VllmEngine) -> None:
    core = vllm_engine._engine
    aborted = vllm_engine.aborted
    stream = vllm_engine.stream(GenerationRequest(prompt="one two", max_tokens=400))
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    assert core.output_processor.get_num_unfinished_requests() == 1  # still generating
    await stream.aclose()
    assert vllm_engine.aborted == aborted + 1
    assert core.output_processor.get_num_unfinished_requests() == 0
    # A deadline cancelling generate aborts its request too.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(vllm_engine.generate(GenerationRequest(prompt="one two", max_tokens=400)), 0.2)
    assert vllm_engine.aborted == aborted + 2
    assert core.output_processor.get_num_unfinished_requests() == 0
    assert (await vllm_engine.generate(GenerationRequest(prompt="one two", max_tokens=3))).completion_tokens == 3


async def test_chat_without_a_template_is_a_clear_error(
    vllm_engine: VllmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_engine._tokenizer, "chat_template", None)
    with pytest.raises(EngineError, match="no chat template"):
        await vllm_engine.generate(GenerationRequest(messages=CHAT))
