"""Hindsight bounds for other rankings: the learned gain, the word features, and the bound itself."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from recserve.core.calibration import fit_logistic, sigmoid
from recserve.evaluation.ceiling import agreement, ceilings, hashed_words, hindsight, learned_gain, markdown, rescored
from recserve.evaluation.replay import DepthTable, TraceReplay, fixed_threshold_grid
from tests.conftest import TRACE_MODELS, answer_row, trace_query, write_traces


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


# Per planted benchmark: the ranking that can find its signal, and the tier whose right answers it picks out.
PLANTED = {
    "words": ("prompt words (device)", 0),
    "agree": ("agreement (edge)", 1),
    "lower": ("lower confidence (edge)", 1),
}


def write_planted_traces(folder: Path, n: int, seed: int = 0) -> Path:
    """Three CHOICE benchmarks on which every tier's own confidence is noise, each with one signal planted:
    "words": the device is right exactly on prompts with the word "easy" (the edge never is);
    "agree": the edge is right exactly where it gives the device's answer;
    "lower": the edge is right exactly where the device is more than 50% confident.
    The cloud is always right; gold is "A", and wrong tiers answer B (device) or C (edge)."""
    rng = random.Random(seed)
    queries, rows = [], []
    for family in PLANTED:
        for split, qid in ((split, qid) for split in ("train", "test") for qid in range(n)):
            easy = rng.random() < 0.5
            query = trace_query(
                family, split, qid, "A", f"{family} {split} question {qid}, {'easy' if easy else 'hard'}?"
            )
            queries.append(query)
            confidences = [rng.uniform(0.05, 0.95) for _ in TRACE_MODELS]
            device_right = easy if family == "words" else rng.random() < 0.5
            edge_right = {"words": False, "agree": device_right, "lower": confidences[0] > 0.5}[family]
            for tier, (right, wrong) in enumerate(((device_right, "B"), (edge_right, "C"), (True, "D"))):
                answer = "A" if right else wrong
                rows.append(answer_row(query, tier, TRACE_MODELS[tier], answer, right=right, p=confidences[tier]))
    return write_traces(folder, queries, rows)


async def test_each_ranking_finds_the_signal_planted_for_it(tmp_path: Path) -> None:
    """Each ranking reaches cloud-only accuracy at the bytes of a tier that keeps exactly its right answers, on
    the benchmark planted for it; ranking by the tiers' own (noise) confidences needs nearly all the bytes."""
    folder = write_planted_traces(tmp_path / "t", n=100)
    rows = await ceilings(folder, TRACE_MODELS, budget=0.4, gap=0.02, points=21)
    assert [row.benchmark for row in rows] == sorted(PLANTED)
    replay = TraceReplay.load(folder, TRACE_MODELS)
    test = await replay.depth_table(replay.queries("test"))
    for row in rows:
        mask = test.benchmarks == row.benchmark
        best = max(a for _, a, spent in fixed_threshold_grid(test, mask, 21) if spent <= 0.4 + 1e-12)
        assert row.by_ranking["own confidence"].accuracy == pytest.approx(best)
        assert row.cloud_only == 1.0
        ranking, tier = PLANTED[row.benchmark]
        depths = np.where(test.correct[mask, tier], tier, 2)
        kept_right = test.link_bytes[mask][np.arange(mask.sum()), depths].sum() / test.cloud_only_bytes[mask].sum()
        found, own = row.by_ranking[ranking].bytes_within_gap, row.by_ranking["own confidence"].bytes_within_gap
        assert found == pytest.approx(kept_right, abs=0.05), (row.benchmark, ranking)
        assert own is not None
        assert own > kept_right + 0.2, row.benchmark
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
    assert table.count("\n| words |") == 1
    assert "bytes within 2 pts" in table
