"""Hindsight bounds for other rankings: the learned gain, the word features, and the bound itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.core.calibration import fit_logistic, sigmoid
from recserve.evaluation.ceiling import agreement, ceilings, hashed_words, hindsight, learned_gain, markdown, rescored
from recserve.evaluation.replay import DepthTable, TraceReplay, fixed_threshold_grid
from tests.conftest import TRACE_MODELS, write_trace_folder


def test_fit_logistic_recovers_planted_coefficients() -> None:
    rng = np.random.default_rng(0)
    design = np.column_stack([np.ones(20_000), rng.normal(size=(20_000, 2))])
    planted = np.array([-0.5, 2.0, -1.0])
    outcomes = rng.random(20_000) < sigmoid(design @ planted)
    assert fit_logistic(design, outcomes, strength=0.0) == pytest.approx(planted, abs=0.1)
    # The ridge pulls towards the prior: with no verdicts at all, the prior itself.
    assert fit_logistic(np.ones((0, 2)), [], prior=[0.3, 1.0]) == pytest.approx([0.3, 1.0])


def test_hashed_words_are_stable_and_case_blind() -> None:
    assert np.array_equal(hashed_words("Which organ makes insulin?"), hashed_words("which ORGAN makes insulin"))
    assert hashed_words("a a b").sum() == pytest.approx(np.log(3) + np.log(2))


def test_a_prompt_word_that_decides_correctness_lifts_the_bound() -> None:
    """Two tiers; the device is right exactly on prompts with the word "easy", and its confidence says nothing.
    Ranking by the learned gain over the prompt's words reaches cloud accuracy at half the bytes; ranking by
    the confidence cannot."""
    rng = np.random.default_rng(1)

    def split(n: int) -> tuple[DepthTable, np.ndarray]:
        easy = rng.random(n) < 0.5
        prompts = [f"question {i} {'easy' if e else 'hard'}" for i, e in enumerate(easy)]
        confidence = np.column_stack([rng.uniform(0.3, 0.9, n), np.ones(n)])
        correct = np.column_stack([easy, np.ones(n, dtype=bool)])
        link_bytes = np.zeros((n, 2, 1), dtype=np.int64)
        link_bytes[:, 1, 0] = 100
        view = np.column_stack([confidence[:, 0], [hashed_words(p) for p in prompts]])
        return DepthTable(np.array(["quiz"] * n), confidence, correct, link_bytes), view

    (train, train_view), (test, test_view) = split(400), split(400)
    gain = learned_gain(train_view, train.correct[:, 0], train.correct[:, 1], test_view)
    everything = np.ones(len(test.benchmarks), dtype=bool)
    easy_share = float(test.correct[:, 0].mean())
    routed = hindsight(rescored(test, everything, 0, gain), everything, 0.6, 0.0, 41)
    plain = hindsight(test, everything, 0.6, 0.0, 41)
    assert routed.accuracy == 1.0
    assert routed.bytes_within_gap == pytest.approx(1 - easy_share, abs=0.02)  # the grid's resolution
    assert plain.accuracy < 0.85
    assert plain.bytes_within_gap is not None
    assert plain.bytes_within_gap > 0.9


async def test_ceilings_of_a_trace_folder(tmp_path: Path) -> None:
    folder = write_trace_folder(tmp_path / "t", n_per_family=40, splits=("train", "test"))
    rows = await ceilings(folder, TRACE_MODELS, budget=0.4, gap=0.02, points=11)
    assert [row.benchmark for row in rows] == ["chat", "quiz"]
    replay = TraceReplay.load(folder, TRACE_MODELS)
    test = await replay.depth_table(replay.queries("test"))
    for row in rows:
        mask = test.benchmarks == row.benchmark
        best = max(a for _, a, spent in fixed_threshold_grid(test, mask, 11) if spent <= 0.4 + 1e-12)
        assert row.by_ranking["own confidence"].accuracy == pytest.approx(best)
        assert row.cloud_only == pytest.approx(test.correct[mask, -1].mean())
        assert set(row.by_ranking) == {
            "own confidence",
            "prompt words (device)",
            "agreement (edge)",
            "lower confidence (edge)",
        }
        for bound in row.by_ranking.values():
            assert bound.accuracy is not None
            assert 0.0 <= bound.accuracy <= 1.0
            assert bound.bytes_within_gap is None or 0.0 <= bound.bytes_within_gap <= 1.0
    # Agreement with the tier below, read from the recorded answers.
    queries = replay.queries("test")
    agrees = agreement(replay, queries, 1)
    answers = replay.trace_set.answers
    assert agrees.tolist() == [
        float(answers[q.key][TRACE_MODELS[0]].answer.lower() == answers[q.key][TRACE_MODELS[1]].answer.lower())
        for q in queries
    ]
    assert 0 < agrees.sum() < len(queries)
    table = markdown(TRACE_MODELS, rows, 0.4, 0.02)
    assert table.count("\n| quiz |") == 1
    assert "bytes within 2 pts" in table
