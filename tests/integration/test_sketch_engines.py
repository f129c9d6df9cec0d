"""Sketches under the grammar on real engines: the tiny llama.cpp and vLLM models, random weights and all, write
sketches that parse, the same ones token for token; without the grammar they write no sketch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from recserve.core.engine import Engine, EngineError, Generation, GenerationRequest, TextDelta
from recserve.core.sketch import (
    SKETCH_MIN_POINTS,
    SketchParseError,
    assemble,
    expand_request,
    parse_sketch,
    sketch_request,
)
from recserve.engines.llama_cpp import LlamaCppEngine
from recserve.engines.vllm import VllmEngine
from recserve.tools.models import TinyModelPaths
from tests.conftest import grammar_accepts, install_hint

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

pytest.importorskip("llama_cpp", reason=install_hint("llama-cpp"))
pytest.importorskip("tokenizers", reason=install_hint("models"))

QUESTIONS = ("What is the capital of France?", "How do I bake bread at home?", "Why is the sky blue?")
MAX_POINTS = (2, 3, 5, 10)
# vLLM (float32) against llama.cpp with a float32 KV cache on the same weights, as in test_vllm_engine.
PARITY_TOLERANCE = 1e-4
INVALID_GRAMMAR = "root ::= point\n"  # `point` is not defined


# (max_points, request) for every question and max_points.
CASES = [(n, sketch_request(question, n)) for question in QUESTIONS for n in MAX_POINTS]


def parses(generation: Generation, max_points: int) -> bool:
    try:
        parse_sketch(generation.text, max_points, truncated=generation.finish_reason == "length")
    except SketchParseError:
        return False
    return True


def check_sketch(max_points: int, request: GenerationRequest, generation: Generation) -> tuple[str, ...]:
    """The sketch's points, after checking that the grammar admits the text (when cut short: what it keeps)."""
    points = parse_sketch(generation.text, max_points, truncated=generation.finish_reason == "length")
    assert len(points) <= max_points
    if generation.finish_reason == "stop":
        assert grammar_accepts(request.grammar, generation.text), generation.text
        assert len(points) >= min(SKETCH_MIN_POINTS, max_points)
    assert all(lp <= 0.0 for lp in generation.token_logprobs)
    return points


async def streamed(engine: Engine, request: GenerationRequest) -> tuple[str, Generation]:
    """A stream's text, delta by delta, and its final Generation."""
    events = [event async for event in engine.stream(request)]
    final = events.pop()
    assert isinstance(final, Generation)
    assert all(isinstance(event, TextDelta) for event in events)
    return "".join(event.text for event in events if isinstance(event, TextDelta)), final


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(tiny_models: dict[str, TinyModelPaths]) -> AsyncIterator[VllmEngine]:
    engine = VllmEngine(str(tiny_models["edge"].hf_dir), max_model_len=512)
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_llama_cpp_sketches_follow_the_grammar_and_parse(llama_engine: LlamaCppEngine) -> None:
    for max_points, request in CASES:
        generation = await llama_engine.generate(request)
        check_sketch(max_points, request, generation)
        # The grammar holds in a stream too, delta by delta.
        text, final = await streamed(llama_engine, request)
        assert text == final.text == generation.text
        assert final.token_logprobs == generation.token_logprobs
    assert llama_engine.aborted == 0


async def test_unconstrained_the_tiny_llama_cpp_model_writes_no_sketch(llama_engine: LlamaCppEngine) -> None:
    free = [(n, await llama_engine.generate(dataclasses.replace(r, grammar=""))) for n, r in CASES]
    assert not any(parses(generation, n) for n, generation in free)


async def test_llama_cpp_refuses_an_invalid_grammar_and_goes_on_serving(llama_engine: LlamaCppEngine) -> None:
    max_points, request = CASES[0]
    with pytest.raises(EngineError, match="grammar is not valid GBNF"):
        await llama_engine.generate(dataclasses.replace(request, grammar=INVALID_GRAMMAR))
    check_sketch(max_points, request, await llama_engine.generate(request))


async def test_a_whole_answer_from_sketch_to_assembly_on_llama_cpp(llama_engine: LlamaCppEngine) -> None:
    question = QUESTIONS[1]
    sketch = await llama_engine.generate(sketch_request(question, 4))
    points = parse_sketch(sketch.text, 4, truncated=sketch.finish_reason == "length")
    expansions = await asyncio.gather(
        *(llama_engine.generate(expand_request(question, points, i, max_tokens=16)) for i in range(len(points)))
    )
    assert all("\n\n" not in e.text and 0 < e.completion_tokens <= 16 for e in expansions)
    answer = assemble(points, [e.text for e in expansions])
    lines = answer.split("\n")
    assert len(lines) == len(points)
    assert all(
        line.startswith(f"{n}. **{point}**") for n, (line, point) in enumerate(zip(lines, points, strict=True), start=1)
    )


@pytest.mark.vllm
async def test_vllm_sketches_follow_the_grammar_token_for_token_with_llama_cpp(
    vllm_engine: VllmEngine, llama_engine: LlamaCppEngine
) -> None:
    for max_points, request in CASES:
        ours, reference = await vllm_engine.generate(request), await llama_engine.generate(request)
        assert check_sketch(max_points, request, ours) == check_sketch(max_points, request, reference)
        assert ours.text == reference.text
        assert ours.finish_reason == reference.finish_reason
        # Both renormalise over the tokens the grammar admits: the forced "1" has log-prob 0 in both.
        assert ours.token_logprobs == pytest.approx(reference.token_logprobs, abs=PARITY_TOLERANCE, rel=0)
        assert ours.token_logprobs[0] == pytest.approx(0.0, abs=1e-6)
    text, final = await streamed(vllm_engine, CASES[-1][1])
    assert text == final.text == ours.text


@pytest.mark.vllm
async def test_unconstrained_the_tiny_vllm_model_writes_no_sketch(vllm_engine: VllmEngine) -> None:
    free = await asyncio.gather(*(vllm_engine.generate(dataclasses.replace(r, grammar="")) for _, r in CASES))
    assert not any(parses(generation, n) for (n, _), generation in zip(CASES, free, strict=True))


@pytest.mark.vllm
async def test_vllm_refuses_an_invalid_grammar_and_goes_on_serving(vllm_engine: VllmEngine) -> None:
    max_points, request = CASES[0]
    with pytest.raises(EngineError, match="grammar"):
        await vllm_engine.generate(dataclasses.replace(request, grammar=INVALID_GRAMMAR))
    assert await vllm_engine.healthy()
    check_sketch(max_points, request, await vllm_engine.generate(request))
