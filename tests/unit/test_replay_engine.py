"""The replay engine serves recorded answers and log-probs from any folder in the trace schema."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recserve.core.confidence import score_choice, score_perplexity
from recserve.core.engine import EngineError, GenerationRequest, UnknownPromptError
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.engines.replay import ReplayEngine, parse_option
from tests.conftest import CHOICE_SYSTEM, TRACE_MODELS

OPTIONS = ("A", "B", "C", "D")


async def started(folder: Path, model: str) -> ReplayEngine:
    engine = create_engine("replay", EngineConfig(traces=str(folder), trace_model=model))
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
