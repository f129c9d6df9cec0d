"""The progressive scheduler picks progressive, cloud-direct or local by its documented rules, shortens sketches as
the cloud's load rises, and refuses inconsistent settings (stale load reports are the tier's: test_progressive_tier)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from recserve.core.progressive import ProgressiveDecision, ProgressivePath, UpstreamLoad
from recserve.policies.progressive import ProgressiveConfig, ProgressiveScheduler

LIST_QUESTION = "What are the most effective ways to deal with stress?"
CODE_QUESTION = "Implement a binary search algorithm to find a specific element in a sorted array."
LONG = 1000


class FixedRouter:
    """A router that knows its questions' suitability: the scheduler's rules without the learned model."""

    def __init__(self, probabilities: dict[str, float]) -> None:
        self.probabilities = probabilities

    def probability(self, question: str) -> float:
        return self.probabilities[question]


def scheduler(**settings: Any) -> ProgressiveScheduler:
    return ProgressiveScheduler(ProgressiveConfig(**settings), FixedRouter({LIST_QUESTION: 0.9, CODE_QUESTION: 0.1}))


def at(pressure: float, capacity: int = 100) -> UpstreamLoad:
    """A report of this pressure."""
    return UpstreamLoad(in_flight=round(pressure * capacity), capacity=capacity)


def test_short_answers_stay_local_whatever_the_question() -> None:
    for question in (LIST_QUESTION, CODE_QUESTION):
        decision = scheduler().decide(question, 199, None)
        assert decision.path is ProgressivePath.LOCAL
        assert decision.max_points == 0
        assert "short answer" in decision.reason
    assert scheduler().decide(LIST_QUESTION, 200, None).path is ProgressivePath.PROGRESSIVE


def test_a_question_unsuited_to_a_sketch_goes_to_the_cloud_whole_until_it_is_overloaded() -> None:
    policy = scheduler(direct_limit=1.5, sketch_limit=2.0)
    assert policy.decide(CODE_QUESTION, LONG, at(0.2)) == ProgressiveDecision(
        ProgressivePath.CLOUD_DIRECT, 0, "unsuited to a sketch (p=0.10 < 0.50), cloud pressure 0.20"
    )
    assert policy.decide(CODE_QUESTION, LONG, at(1.5)).path is ProgressivePath.CLOUD_DIRECT
    overloaded = policy.decide(CODE_QUESTION, LONG, at(1.6))
    assert overloaded.path is ProgressivePath.LOCAL
    assert "direct_limit" in overloaded.reason


def test_a_suited_question_is_sketched_until_the_sketch_limit_even_where_full_answers_stay_local() -> None:
    policy = scheduler(direct_limit=1.5, sketch_limit=2.0)
    idle = policy.decide(LIST_QUESTION, LONG, at(0.0))
    assert idle.path is ProgressivePath.PROGRESSIVE
    assert idle.max_points == 10
    # Between the limits: the sketch still goes to the cloud while a full answer would not.
    assert policy.decide(LIST_QUESTION, LONG, at(1.8)).path is ProgressivePath.PROGRESSIVE
    assert policy.decide(CODE_QUESTION, LONG, at(1.8)).path is ProgressivePath.LOCAL
    overloaded = policy.decide(LIST_QUESTION, LONG, at(2.1))
    assert overloaded.path is ProgressivePath.LOCAL
    assert "sketch_limit" in overloaded.reason


def test_the_router_threshold_decides_suitability() -> None:
    assert scheduler(threshold=0.95).decide(LIST_QUESTION, LONG, None).path is ProgressivePath.CLOUD_DIRECT
    assert scheduler(threshold=0.05).decide(CODE_QUESTION, LONG, None).path is ProgressivePath.PROGRESSIVE


def test_sketches_shrink_from_max_to_min_points_as_load_rises() -> None:
    policy = scheduler(min_points=3, max_points=10, light_load=0.5, heavy_load=1.0)
    pressures = [step / 20 for step in range(41)]  # 0 to 2
    points = [policy.decide(LIST_QUESTION, LONG, at(p)).max_points for p in pressures]
    assert all(later <= earlier for earlier, later in pairwise(points))
    assert points[pressures.index(0.5)] == 10
    assert points[pressures.index(0.75)] == 7  # halfway: 10 - 0.5·7 = 6.5, rounded half up
    assert points[pressures.index(1.0)] == points[-1] == 3
    assert len(set(points)) > 3


def test_pressure_is_in_flight_over_capacity_and_a_report_without_capacity_uses_the_configured_one() -> None:
    policy = scheduler(cloud_capacity=256)
    assert policy.pressure(UpstreamLoad(in_flight=1001, capacity=1000)) == pytest.approx(1.001)
    assert policy.pressure(UpstreamLoad(in_flight=64, capacity=0)) == 0.25
    assert policy.pressure(None) == 0.0
    assert policy.decide(LIST_QUESTION, LONG, UpstreamLoad(in_flight=1001, capacity=1000)).max_points == 3


def test_unknown_load_counts_as_an_idle_cloud() -> None:
    decision = scheduler().decide(LIST_QUESTION, LONG, None)
    assert decision.path is ProgressivePath.PROGRESSIVE
    assert decision.max_points == 10
    assert "load unknown" in decision.reason


def test_sketches_are_capped_so_that_every_point_has_room() -> None:
    policy = scheduler(tokens_per_point=40, min_answer_tokens=200)
    assert policy.decide(LIST_QUESTION, 200, None).max_points == 5
    assert policy.decide(LIST_QUESTION, 280, None).max_points == 7
    assert policy.decide(LIST_QUESTION, 4000, None).max_points == 10


def test_learned_answer_lengths_lower_the_expected_length() -> None:
    policy = scheduler(length_window=50, length_min_observations=5)
    for _ in range(4):
        policy.observe_answer(150, max_tokens=LONG)
    policy.observe_answer(10, max_tokens=50)  # a short cascade answer: not counted
    assert policy.expected_tokens(LONG) == LONG
    assert policy.decide(LIST_QUESTION, LONG, None).path is ProgressivePath.PROGRESSIVE
    policy.observe_answer(150, max_tokens=LONG)
    assert policy.expected_tokens(LONG) == 150
    assert policy.expected_tokens(100) == 100
    assert policy.decide(LIST_QUESTION, LONG, None).reason == "short answer: 150 expected tokens < 200"
    for _ in range(10):
        policy.observe_answer(600, max_tokens=LONG)
    assert policy.expected_tokens(LONG) == 600


def test_length_learning_can_be_turned_off() -> None:
    policy = scheduler(length_window=0)
    for _ in range(50):
        policy.observe_answer(10, max_tokens=LONG)
    assert policy.expected_tokens(LONG) == LONG


def test_decisions_are_deterministic() -> None:
    questions = [LIST_QUESTION, CODE_QUESTION] * 3
    loads = [None, at(0.3), at(0.8), at(1.7), at(2.5), UpstreamLoad(1, 0)]
    first = [scheduler().decide(q, LONG, load) for q in questions for load in loads]
    assert first == [scheduler().decide(q, LONG, load) for q in questions for load in loads]


def test_the_default_scheduler_uses_the_bundled_router() -> None:
    policy = ProgressiveConfig().build()
    assert policy.decide(LIST_QUESTION, LONG, None).path is ProgressivePath.PROGRESSIVE
    assert policy.decide(CODE_QUESTION, LONG, None).path is ProgressivePath.CLOUD_DIRECT
    assert ProgressivePath("cloud-direct") is ProgressivePath.CLOUD_DIRECT


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_points": 5, "max_points": 4}, r"min_points \(5\) must not exceed max_points \(4\)"),
        ({"max_points": 0}, "max_points must be at least 1, got 0"),
        ({"threshold": 1.5}, r"threshold must be within \[0, 1\], got 1.5"),
        ({"light_load": 1.0, "heavy_load": 1.0}, r"light_load \(1.0\) must be below heavy_load \(1.0\)"),
        ({"light_load": -0.1}, "light_load must not be negative"),
        ({"direct_limit": 3.0, "sketch_limit": 2.0}, r"direct_limit \(3.0\) must not exceed sketch_limit \(2.0\)"),
        ({"min_answer_tokens": 100}, r"min_answer_tokens \(100\) must be at least min_points \* tokens_per_point"),
        ({"length_window": 10}, r"length_min_observations \(20\) must not exceed length_window \(10\)"),
    ],
)
def test_inconsistent_settings_are_refused_with_a_clear_message(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^progressive scheduler: .*{message}"):
        ProgressiveConfig(**settings)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        scheduler().decide(LIST_QUESTION, 0, None)
    with pytest.raises(ValueError, match="completion_tokens must not be negative"):
        scheduler().observe_answer(-1, LONG)
