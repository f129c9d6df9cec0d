"""The trace client: requests, grading by recorded verdict or by reference, Feedback, and the summary table."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from recserve.client.tally import format_table, summaries, summary_columns
from recserve.client.trace_client import Outcome, TraceClient, tier_names
from recserve.core.cascade import link_tiers
from recserve.core.offload import OffloadPolicy
from recserve.core.tier import Tier
from recserve.core.traces import TraceSet
from recserve.engines.replay import ReplayEngine
from recserve.policies.simple import ForwardAllPolicy, RecServeConfig, RecServePolicy
from recserve.v1 import tier_pb2 as pb
from tests.conftest import TRACE_MODELS


@pytest.fixture
def traces(trace_folder: Path) -> TraceSet:
    return TraceSet.load(trace_folder)


class InProcessStack:
    """Three replay tiers linked in process, with one metrics registry to read their verdict counters from."""

    def __init__(self, folder: Path, policies: Sequence[OffloadPolicy]) -> None:
        self.registry = CollectorRegistry()
        self.engines = [ReplayEngine(folder, model) for model in TRACE_MODELS]
        self.tiers: list[Tier] = link_tiers(tier_names(3), self.engines, policies, registry=self.registry)

    def verdicts(self) -> Counter[tuple[str, bool]]:
        """(tier, right) -> answers judged there, from the tiers' own counters."""
        counted: Counter[tuple[str, bool]] = Counter()
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "recserve_judged_answers_total":
                    counted[(sample.labels["tier"], sample.labels["verdict"] == "right")] += int(sample.value)
        return counted


@pytest.fixture
async def stack(trace_folder: Path) -> AsyncIterator[InProcessStack]:
    stack = InProcessStack(trace_folder, [RecServePolicy(RecServeConfig(beta=0.4, window=8)) for _ in TRACE_MODELS])
    for engine in stack.engines:
        await engine.start()
    yield stack
    for engine in stack.engines:
        await engine.shutdown()


def answered(outcomes: Sequence[Outcome]) -> Counter[tuple[str, bool]]:
    names = tier_names(3)
    return Counter((names[o.depth], bool(o.correct)) for o in outcomes)


def test_tier_names_of_chains_of_any_length() -> None:
    assert tier_names(2) == ("device", "cloud")
    assert tier_names(3) == ("device", "edge", "cloud")
    assert tier_names(5) == ("device", "edge1", "edge2", "edge3", "cloud")


def test_requests_have_fixed_width_ids_and_the_task_of_the_benchmark(traces: TraceSet) -> None:
    client = TraceClient(traces, TRACE_MODELS, id_prefix="run-", id_digits=5)
    quiz = next(q for q in traces.queries if q.benchmark == "quiz")
    chat = next(q for q in traces.queries if q.benchmark == "chat")
    first, later = client.request(quiz, 0), client.request(quiz, 99_999)
    assert (first.request_id, later.request_id) == ("run-00000", "run-99999")
    assert first.ByteSize() == later.ByteSize()
    assert client.request(quiz).request_id == ""  # the first tier names it
    assert (first.task, list(first.options), first.sampling.max_tokens) == (pb.TASK_KIND_CHOICE, list("ABCD"), 1)
    assert client.request(chat, 1).task == pb.TASK_KIND_GENERATE
    assert first.reference == ""
    assert TraceClient(traces, TRACE_MODELS, judge_reference=True).request(quiz, 0).reference == quiz.gold


async def test_recorded_verdicts_grade_the_answering_model_and_go_back_as_feedback(
    traces: TraceSet, stack: InProcessStack
) -> None:
    client = TraceClient(traces, TRACE_MODELS)
    queries = list(traces.queries)
    outcomes = await client.run(stack.tiers[0], queries, feedback=True)
    assert {o.depth for o in outcomes} == {0, 1, 2}
    for query, outcome in zip(queries, outcomes, strict=True):
        assert outcome.benchmark == query.benchmark
        assert outcome.correct == traces.answers[query.key][TRACE_MODELS[outcome.depth]].correct
        # Bytes on every link the request crossed, none above the answering tier.
        assert all(size > 0 for size in outcome.link_bytes[: outcome.depth])
        assert all(size == 0 for size in outcome.link_bytes[outcome.depth :])
    # Each verdict reached the tier that answered, through the first tier's Feedback.
    assert stack.verdicts() == answered(outcomes)


async def test_without_feedback_the_tiers_hear_no_verdict(traces: TraceSet, stack: InProcessStack) -> None:
    outcomes = await TraceClient(traces, TRACE_MODELS).run(stack.tiers[0], traces.queries[:20])
    assert len(outcomes) == 20
    assert not stack.verdicts()


async def test_reference_grading_goes_through_the_judge_and_the_tiers_judge_themselves(
    traces: TraceSet, stack: InProcessStack
) -> None:
    """In the generated traces a recorded answer is the reference exactly when it is recorded right, so the judge
    must agree with the recorded verdicts; a query without a reference is not judged."""
    client = TraceClient(traces, TRACE_MODELS, judge_reference=True)
    queries = list(traces.queries)
    queries[0] = dataclasses.replace(queries[0], gold="")
    outcomes = await client.run(stack.tiers[0], queries)
    assert outcomes[0].correct is None
    for query, outcome in zip(queries[1:], outcomes[1:], strict=True):
        assert outcome.correct == traces.answers[query.key][TRACE_MODELS[outcome.depth]].correct
    assert stack.verdicts() == answered(outcomes[1:])
    with pytest.raises(ValueError, match="judged by the tiers"):
        await client.run(stack.tiers[0], queries, feedback=True)


async def test_concurrent_runs_return_outcomes_in_query_order(traces: TraceSet, trace_folder: Path) -> None:
    stack = InProcessStack(trace_folder, [ForwardAllPolicy() for _ in TRACE_MODELS])
    for engine in stack.engines:
        await engine.start()
    # Ids of the same width but not reused: a tier refuses an id it has already served.
    first, second = (
        TraceClient(traces, TRACE_MODELS, id_prefix="one-"),
        TraceClient(traces, TRACE_MODELS, id_prefix="two-"),
    )
    seen: list[Outcome] = []
    try:
        one_at_a_time = await first.run(stack.tiers[0], traces.queries)
        concurrent = await second.run(stack.tiers[0], traces.queries, concurrency=8, on_outcome=seen.append)
    finally:
        for engine in stack.engines:
            await engine.shutdown()
    assert concurrent == one_at_a_time
    assert Counter(seen) == Counter(one_at_a_time)


def test_summaries_count_only_judged_answers_and_print_as_a_table() -> None:
    outcomes = [
        Outcome("quiz", 0, True, (0, 0)),
        Outcome("quiz", 2, False, (10, 20)),
        Outcome("chat", 1, None, (30, 0)),
    ]
    figures = summaries(outcomes, 3, {"quiz": 60, "chat": 40})
    assert (figures["quiz"].n, figures["quiz"].judged, figures["quiz"].accuracy) == (2, 2, 0.5)
    assert (figures["chat"].judged, figures["chat"].accuracy) == (0, 0.0)
    assert (figures["overall"].n, figures["overall"].judged, figures["overall"].accuracy) == (3, 2, 0.5)
    assert figures["overall"].bytes_by_link == [40, 20]
    assert figures["overall"].bytes_vs_cloud_only == 0.6
    lines = format_table(figures, summary_columns(tier_names(3))).splitlines()
    assert lines[0].split() == [
        "benchmark", "n", "accuracy", "device", "share", "edge", "share", "cloud", "share",
        "device->edge", "bytes", "edge->cloud", "bytes", "bytes", "total", "vs", "cloud-only",
    ]  # fmt: skip
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["chat", "1", "n/a", "0.000", "1.000", "0.000", "30", "0", "30", "0.750"]
    assert lines[4].split() == ["overall", "3", "0.500", "0.333", "0.333", "0.333", "40", "20", "60", "0.600"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns
