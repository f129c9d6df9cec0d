"""The replay engine serves recorded answers and log-probs from any folder in the trace schema."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path

import pytest

from recserve.core.confidence import score_choice, score_perplexity
from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta, UnknownPromptError
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.engines.replay import ReplayEngine, parse_option
from tests.conftest import CHOICE_SYSTEM, GENERATE_SYSTEM, TRACE_MODELS, answer_row, trace_query, write_traces

OPTIONS = ("A", "B", "C", "D")


async def started(folder: Path, model: str, delay: float = 0.0) -> ReplayEngine:
    engine = create_engine("replay", EngineConfig(traces=str(folder), trace_model=model, replay_delay_seconds=delay))
    assert isinstance(engine, ReplayEngine)
    await engine.start()
    return engine


async def test_choice_confidence_equals_the_recorded_probability(trace_folder: Path) -> None:
    traces = TraceSet.load(trace_folder)
    engine = await started(trace_folder, "medium")
    query = next(q for q in traces.queries if q.benchmark == "quiz")
    recorded = traces.answers[query.key]["medium"]
    generation = await engine.generate(GenerationRequest(prompt=query.user_prompt, options=OPTIONS))
    assert generation.text == recorded.answer
    score = score_choice(generation, OPTIONS)
    assert score.chosen_option == recorded.answer
    assert score.value == pytest.approx(math.exp(recorded.logprob))


async def test_generate_confidence_equals_the_recorded_probability(trace_folder: Path) -> None:
    traces = TraceSet.load(trace_folder)
    engine = await started(trace_folder, "large")
    for query in [q for q in traces.queries if q.benchmark == "chat"][:5]:
        recorded = traces.answers[query.key]["large"]
        generation = await engine.generate(GenerationRequest(prompt=query.user_prompt))
        assert generation.text == recorded.answer
        assert score_perplexity(generation).value == pytest.approx(math.exp(recorded.logprob))


async def test_unknown_prompt_and_wrong_system_prompt_are_not_found(trace_folder: Path) -> None:
    engine = await started(trace_folder, "small")
    with pytest.raises(UnknownPromptError, match="no recorded answer"):
        await engine.generate(GenerationRequest(prompt="never asked"))
    with pytest.raises(UnknownPromptError, match="system prompt"):
        await engine.generate(GenerationRequest(prompt="quiz question number 0?", system_prompt="other"))
    found = await engine.generate(GenerationRequest(prompt="quiz question number 0?", system_prompt=CHOICE_SYSTEM))
    assert found.text


async def test_a_grammar_replays_a_recorded_prompt_and_cannot_help_an_unrecorded_one(trace_folder: Path) -> None:
    engine = await started(trace_folder, "small")
    recorded = GenerationRequest(prompt="chat question number 1?", system_prompt=GENERATE_SYSTEM)
    constrained = await engine.generate(dataclasses.replace(recorded, grammar='root ::= "1. " [a-z]+'))
    assert constrained == await engine.generate(recorded)
    with pytest.raises(UnknownPromptError, match=r"no recorded answer.*cannot generate one that follows the request's"):
        await engine.generate(GenerationRequest(prompt="never asked", grammar='root ::= "x"'))
    with pytest.raises(UnknownPromptError, match="cannot generate one that follows"):
        await anext(engine.stream(GenerationRequest(messages=(ChatMessage("user", "never"),), grammar='root ::= "x"')))


async def test_unknown_model_or_folder_is_a_clear_error(trace_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"not in trace folder .* it has: small, medium, large"):
        await started(trace_folder, "gpt-9")
    with pytest.raises(EngineError, match="is not a trace folder"):
        await started(tmp_path, "small")


def test_loads_any_number_of_models(trace_folder: Path) -> None:
    assert TraceSet.load(trace_folder).models == TRACE_MODELS
    assert TraceSet.load(trace_folder, ["large"]).models == ("large",)


def test_bundled_demo_trace_has_the_demo_chain_and_all_benchmarks() -> None:
    traces = TraceSet.load(BUNDLED_TRACE)
    assert traces.models == BUNDLED_CHAIN
    assert traces.benchmarks() == ["gsm8k", "medmcqa", "mmlu", "triviaqa", "truthfulqa"]
    assert len(traces.queries) == 1531 + 1000 + 1000 + 517 + 300


def test_parse_option() -> None:
    assert parse_option(" B ", OPTIONS) == "B"
    assert parse_option("C. because", OPTIONS) == "C"
    assert parse_option("D: x", OPTIONS) == "D"
    assert parse_option("I cannot pick", OPTIONS) is None


async def _events(engine: ReplayEngine, request: GenerationRequest) -> tuple[list[TextDelta], Generation]:
    events = [event async for event in engine.stream(request)]
    final = events.pop()
    assert isinstance(final, Generation)
    assert all(isinstance(event, TextDelta) for event in events)
    return events, final  # type: ignore[return-value]


@pytest.fixture
def spaced_folder(tmp_path: Path) -> Path:
    """One GENERATE question whose recorded answer has leading, repeated and trailing whitespace."""
    query = trace_query("chat", "test", 0, "gold", "say it")
    return write_traces(
        tmp_path, [query], [answer_row(query, 0, "small", "  Paris is\n the  capital. ", right=True, p=0.5)]
    )


async def test_stream_yields_words_that_add_up_to_the_generated_answer(spaced_folder: Path) -> None:
    engine = await started(spaced_folder, "small")
    request = GenerationRequest(prompt="say it", system_prompt=GENERATE_SYSTEM)
    deltas, final = await _events(engine, request)
    assert [d.text for d in deltas] == ["  Paris", " is", "\n the", "  capital.", " "]
    assert "".join(d.text for d in deltas) == final.text == "  Paris is\n the  capital. "
    assert final == await engine.generate(request)
    assert final.finish_reason == "stop"
    assert final.tokens == ()
    assert all(d.tokens == () for d in deltas)
    assert engine.aborted == 0


async def test_single_turn_chat_is_answered_like_the_prompt(trace_folder: Path) -> None:
    engine = await started(trace_folder, "medium")
    prompt = "quiz question number 3?"
    expected = await engine.generate(GenerationRequest(prompt=prompt, system_prompt=CHOICE_SYSTEM, options=OPTIONS))
    system, user = ChatMessage("system", CHOICE_SYSTEM), ChatMessage("user", prompt)
    assert await engine.generate(GenerationRequest(messages=(system, user), options=OPTIONS)) == expected
    assert (await engine.generate(GenerationRequest(messages=(user,)))).text == expected.text
    with pytest.raises(UnknownPromptError, match="system prompt"):
        await engine.generate(GenerationRequest(messages=(ChatMessage("system", "other"), user)))
    several = (user, ChatMessage("assistant", expected.text), user)
    with pytest.raises(UnknownPromptError, match="single-turn chats"):
        await engine.generate(GenerationRequest(messages=several))


async def test_closing_a_stream_early_counts_an_abort_and_the_delay_paces_it(spaced_folder: Path) -> None:
    engine = await started(spaced_folder, "small", delay=0.05)
    request = GenerationRequest(prompt="say it")
    stream = engine.stream(request)
    began = time.monotonic()
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    assert first.text == "  Paris"
    assert time.monotonic() - began >= 0.05
    await stream.aclose()
    assert engine.aborted == 1
    # A deadline cancelling generate aborts too.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.generate(request), timeout=0.12)
    assert engine.aborted == 2
    # Reading a stream to its end is no abort, and five words took five delays.
    began = time.monotonic()
    await engine.generate(request)
    assert time.monotonic() - began >= 5 * 0.05
    assert engine.aborted == 2
