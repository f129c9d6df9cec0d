"""The bound on the budget goal: every threshold policy is among its points, and its combination is exact."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest

from recserve.evaluation.chain_study import TIE, study_chain
from recserve.evaluation.replay import DepthTable, threshold_candidates
from recserve.evaluation.spending_bound import (
    _bound,
    benchmark_rights,
    best_by_unit,
    bound_chain,
    cross_validated_split,
    halving,
    leaned_budgets,
    threshold_policies,
)
from recserve.evaluation.splits import tune_family_fill_caps
from tests.conftest import write_trace_folder


def _random_table(rows: int, tiers: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    confidence = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], size=(rows, tiers))  # ties on purpose
    correct = rng.random((rows, tiers)) < 0.3 + 0.2 * np.arange(tiers)
    cost = np.cumsum(rng.integers(50, 500, size=(rows, tiers)), axis=1)
    return confidence, correct, cost


@pytest.mark.parametrize("tiers", [2, 3])
def test_every_fixed_threshold_policy_is_among_the_bounds_points(tiers: int) -> None:
    confidence, correct, cost = _random_table(12, tiers, seed=tiers)
    costs, rights = threshold_policies(confidence, correct, cost)
    points = set(zip(costs.tolist(), rights.tolist(), strict=True))
    link_bytes = np.zeros((12, tiers, 1), dtype=np.int64)
    link_bytes[:, :, 0] = cost
    table = DepthTable(np.array(["b"] * 12), confidence, correct, link_bytes)
    grids = [threshold_candidates(confidence[:, d], 7) for d in range(tiers - 1)]
    rows = np.arange(12)
    for thresholds in itertools.product(*grids):
        depths = table.fixed_threshold_depths(np.array(thresholds))
        assert (int(cost[rows, depths].sum()), int(correct[rows, depths].sum())) in points


def test_the_points_are_exactly_the_k_least_confident_at_each_tier() -> None:
    confidence, correct, cost = _random_table(7, 3, seed=5)
    expected = set()
    first = np.argsort(confidence[:, 0], kind="stable")
    for k1 in range(8):
        up = first[:k1]
        second = up[np.argsort(confidence[up, 1], kind="stable")]
        for k2 in range(k1 + 1):
            depth = np.zeros(7, dtype=np.int64)
            depth[up] = 1
            depth[second[:k2]] = 2
            expected.add((int(cost[np.arange(7), depth].sum()), int(correct[np.arange(7), depth].sum())))
    costs, rights = threshold_policies(confidence, correct, cost)
    assert set(zip(costs.tolist(), rights.tolist(), strict=True)) == expected
    assert costs.size == sum(k + 1 for k in range(8))


def test_the_combination_is_the_best_one_within_the_band_and_the_ceiling() -> None:
    rng = np.random.default_rng(1)
    cloud = {"a": 60, "b": 40}  # units of 1 byte; 100 bytes overall
    fronts = {
        name: np.where(rng.random(total + 1) < 0.5, rng.integers(0, 30, total + 1), -1) for name, total in cloud.items()
    }
    for ceiling, band in itertools.product((20, 35, 50), (0.02, 0.1, None)):
        best = -1
        targets = [None] if band is None else np.arange(0.0, ceiling / 100 + band + 0.0025, 0.0025)
        for target in targets:
            for ua, ub in itertools.product(range(61), range(41)):
                if ua + ub > ceiling or fronts["a"][ua] < 0 or fronts["b"][ub] < 0:
                    continue
                if target is not None and not all(
                    int(np.floor((target - band) * cloud[n])) <= u <= int(np.floor((target + band) * cloud[n]))
                    for n, u in (("a", ua), ("b", ub))
                ):
                    continue
                best = max(best, int(fronts["a"][ua] + fronts["b"][ub]))
        assert _bound(fronts, cloud, 1.0, ceiling, 10, band) == pytest.approx(best / 10)


def test_points_round_down_to_their_unit_and_keep_the_most_right_answers() -> None:
    best = best_by_unit(np.array([0, 9, 10, 19, 25]), np.array([1, 4, 2, 3, 7]), 10.0, 3)
    assert best.tolist() == [4, 3, 7]


def test_the_bound_is_never_behind_casserve_given_its_own_split_of_the_bytes(tmp_path: Path) -> None:
    """CasServe is a threshold policy: free to split the bytes across benchmarks, the bound is at least as accurate
    at its bytes; held to the band, it may be behind."""
    folder = write_trace_folder(tmp_path, n_per_family=40, splits=("train", "test"))
    study = asyncio.run(study_chain(folder, ("small", "large")))
    bound = asyncio.run(bound_chain(folder, study))
    for row, bound_row in zip(study.budgets, bound.budgets, strict=True):
        assert bound_row.free["casserve"] >= row.casserve.accuracy - 1e-9
        assert bound_row.held["casserve"] <= bound_row.free["casserve"] + 1e-9
        assert bound_row.free["recserve"] > row.recserve.accuracy - TIE
        assert bound_row.learned is not None
        assert bound_row.leaned is not None
        assert 0.0 < bound_row.learned["casserve"] <= 1.0
        assert 0.0 < bound_row.leaned["casserve"] <= 1.0


def test_a_halving_splits_every_benchmark_in_two() -> None:
    benchmarks = np.array(["a"] * 7 + ["b"] * 10)
    half = halving(benchmarks, seed=3)
    assert int(half[:7].sum()) == 3
    assert int(half[7:].sum()) == 5
    assert not np.array_equal(half, halving(benchmarks, seed=4))


def test_the_cross_validated_split_is_scored_on_queries_it_was_not_chosen_on() -> None:
    """One half of the queries wants every byte on the first link (the middle tier is right there, the top wrong),
    the other every forwarded request sent to the top (the other way round). Each half scored with the split the other
    half chose gets nothing right; a split chosen on the scored half itself would get most of its forwards right."""
    rows, budget, seed = 40, 0.25, 7
    benchmarks = np.array(["b"] * rows)
    half = halving(benchmarks, seed)
    correct = np.zeros((rows, 3), dtype=bool)
    correct[half, 1] = True  # the middle tier is right on one half
    correct[~half, 2] = True  # the top on the other
    link_bytes = np.zeros((rows, 3, 2), dtype=np.int64)
    link_bytes[:, 1, 0] = link_bytes[:, 2, :] = 100  # a request answered at depth d crossed the first d links
    confidence = np.random.default_rng(1).random((rows, 3))
    table = DepthTable(benchmarks, confidence, correct, link_bytes)

    assert cross_validated_split(table, budget, seeds=(seed,)) == pytest.approx(0.0)
    ties = np.random.default_rng(0).random(rows)
    chosen_on_itself = sum(
        benchmark_rights(
            table, np.flatnonzero(part), {"b": budget}, dict(tune_family_fill_caps(table.subset(part), budget)), ties
        )["b"]
        for part in (half, ~half)
    )
    assert chosen_on_itself / rows > 0.3


def test_budgets_lean_within_the_band_toward_where_forwarding_pays_and_spend_the_same_bytes() -> None:
    """On "pays" the top tier is right where the device is wrong; on "flat" both are right. The bytes go to "pays",
    within the band, and the bytes over the table are what every benchmark at the budget would spend."""
    rows, budget, band = 60, 0.3, 0.02
    benchmarks = np.array(["pays"] * 40 + ["flat"] * 20)
    correct = np.ones((rows, 2), dtype=bool)
    correct[:40, 0] = False
    link_bytes = np.zeros((rows, 2, 1), dtype=np.int64)
    link_bytes[:, 1, 0] = 100
    confidence = np.random.default_rng(2).random((rows, 2))
    budgets = leaned_budgets(DepthTable(benchmarks, confidence, correct, link_bytes), budget, band)
    assert budgets["flat"] == pytest.approx(budget - band)
    assert budgets["pays"] == pytest.approx(budget + band * 20 / 40)  # what "flat" frees, over twice its bytes
    assert all(abs(b - budget) <= band + 1e-12 for b in budgets.values())
    assert 40 * (budgets["pays"] - budget) + 20 * (budgets["flat"] - budget) == pytest.approx(0.0)
