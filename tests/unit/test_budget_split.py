"""The budget policy's split between links: chosen on labelled queries of the chain, and held online in bytes."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from recserve.evaluation.replay import DepthTable
from recserve.evaluation.splits import split_at_budget, tune_family_fill_caps
from recserve.policies.budget import MIN_RATE, BudgetConfig, BudgetPolicy
from recserve.policies.spending import split_budget


def three_tier_table(n: int, middle_as_good_as_top: bool, seed: int = 0) -> DepthTable:
    """One family; the device is right with probability its confidence, the cloud 90% of the time, and the middle
    tier either right exactly when the cloud is or exactly when the device is. Every link a request crosses costs
    100 bytes."""
    rng = np.random.default_rng(seed)
    confidence = rng.random((n, 3))
    device = rng.random(n) < confidence[:, 0]
    cloud = rng.random(n) < 0.9
    middle = cloud if middle_as_good_as_top else device
    link_bytes = np.zeros((n, 3, 2), dtype=np.int64)
    link_bytes[:, 1, 0] = 100
    link_bytes[:, 2, :] = 100
    return DepthTable(np.array(["quiz"] * n), confidence, np.column_stack([device, middle, cloud]), link_bytes)


@pytest.mark.parametrize("middle_as_good_as_top", [True, False])
def test_the_policy_learns_to_spend_on_the_link_that_pays(middle_as_good_as_top: bool) -> None:
    budget = 0.4
    table = three_tier_table(2000, middle_as_good_as_top)
    caps = tune_family_fill_caps(table, budget)
    (family, cap), *_ = caps
    # All of the budget on the first link (the middle tier answers as well as the cloud, for half the bytes), or
    # straight through to the cloud (the middle tier knows no more than the device).
    assert (family, cap) == ("quiz", pytest.approx(2 * budget if middle_as_good_as_top else budget))
    rows = np.arange(2000)
    ties = np.zeros(2000)
    chosen = split_at_budget(table, rows, split_budget(budget, 2, cap), budget, ties)
    for other in np.linspace(budget, 2 * budget, 5):
        assert chosen[0] >= split_at_budget(table, rows, split_budget(budget, 2, other), budget, ties)[0] - 0.005
    # The policy built with the caps forwards at the chosen split: the middle tier keeps nearly everything, or
    # forwards everything that reaches it.
    policy = BudgetConfig(byte_budget=budget, links=2, family_fill_caps=caps).build()
    assert policy.target_rate(0, "quiz") == pytest.approx(2 * budget if middle_as_good_as_top else budget)
    assert policy.target_rate(1, "quiz") == pytest.approx(MIN_RATE if middle_as_good_as_top else 1.0)
    assert policy.target_rate(0, "other family") == pytest.approx(policy.rates[0])  # the default fill cap


def chain_table(other: DepthTable, quizzes: int = 1) -> DepthTable:
    """`quizzes` families whose middle tier answers as well as the cloud ("quiz0", ...), beside `other` renamed
    "other"."""
    parts = [*(three_tier_table(2000, middle_as_good_as_top=True, seed=10 + i) for i in range(quizzes)), other]
    names = [*(np.array([f"quiz{i}"] * 2000) for i in range(quizzes)), np.array(["other"] * len(other.benchmarks))]
    return DepthTable(
        np.concatenate(names),
        np.vstack([part.confidence for part in parts]),
        np.vstack([part.correct for part in parts]),
        np.concatenate([part.link_bytes for part in parts]),
    )


def test_a_family_that_cannot_tell_the_splits_apart_takes_the_chains_choice() -> None:
    budget = 0.4
    # Every tier right on the same requests: no split is better than another on this family's own queries.
    flat = three_tier_table(300, middle_as_good_as_top=False, seed=1)
    flat = replace(flat, correct=np.repeat(flat.correct[:, :1], 3, axis=1))
    table = chain_table(flat)
    caps = dict(tune_family_fill_caps(table, budget))
    assert caps["quiz0"] == pytest.approx(2 * budget)
    # The chain's choice: its middle tier pays on the family that can tell.
    assert caps["other"] == pytest.approx(2 * budget)
    alone = dict(tune_family_fill_caps(table, budget, shrinkage=0.0))
    assert alone["other"] == pytest.approx(budget)  # on its own, the first of equals


def test_a_family_the_traffic_does_not_carry_does_not_lean_the_served_ones() -> None:
    budget = 0.4
    flat = three_tier_table(300, middle_as_good_as_top=False, seed=1)
    flat = replace(flat, correct=np.repeat(flat.correct[:, :1], 3, axis=1))
    table = chain_table(flat)
    # "quiz0" is in the calibration set only: the flat family, alone in the traffic, keeps its own choice.
    served = dict(tune_family_fill_caps(table, budget, served={"other"}))
    assert served["other"] == pytest.approx(budget)
    assert served["quiz0"] == pytest.approx(2 * budget)  # still chosen, for a family that does come
    # Served families the set lacks leave the mean to the set's own.
    assert dict(tune_family_fill_caps(table, budget, served={"unseen"}))["other"] == pytest.approx(2 * budget)


def test_a_family_with_a_clear_split_of_its_own_keeps_it() -> None:
    budget = 0.4
    # The middle tier knows no more than the device on this family: forward straight through to the cloud. The
    # chain's three other families want the first link filled, and so does their mean with this one.
    table = chain_table(three_tier_table(2000, False, seed=1), quizzes=3)
    chains_choice = dict(tune_family_fill_caps(table, budget, shrinkage=1000.0))["other"]
    assert chains_choice > budget + 0.1
    assert dict(tune_family_fill_caps(table, budget))["other"] == pytest.approx(budget)


def test_a_chain_of_one_link_has_no_split_to_choose() -> None:
    table = three_tier_table(100, True)
    two_tiers = DepthTable(table.benchmarks, table.confidence[:, :2], table.correct[:, :2], table.link_bytes[:, :2, :1])
    assert tune_family_fill_caps(two_tiers, 0.4) == ()


def serve(tiers: list[BudgetPolicy], rng: random.Random, edge_reply: int) -> tuple[int, int]:
    """One request through device → edge → cloud: (bytes spent, cloud-only bytes). Each link carries the request
    (its size plus 40 bytes per hop below) up and the answering tier's reply plus 40 bytes per hop down."""
    size = rng.randint(200, 600)
    cloud_reply = 300
    cloud_only = (size + 40 + cloud_reply + 120) + (size + 80 + cloud_reply + 120)
    device, edge, cloud = tiers
    links: list[int] = []
    c0, c1 = rng.random(), rng.random()
    if device.decide("quiz", c0, is_last=False).forward:
        if edge.decide("quiz", c1, is_last=False, lower=(c0,)).forward:
            cloud.decide("quiz", rng.random(), is_last=True, lower=(c0, c1))
            links = [size + 40 + cloud_reply + 120, size + 80 + cloud_reply + 120]
            edge.observe_cost("quiz", size=size + 40, spent=links[1:], lower=(c0,))
        else:
            links = [size + 40 + edge_reply + 80]
            edge.observe_cost("quiz", size=size + 40, spent=(), lower=(c0,))
    device.observe_cost("quiz", size=size, spent=links)
    return sum(links), cloud_only


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_the_byte_controller_holds_the_budget_when_the_better_link_changes_midway(budget: float) -> None:
    """Halfway through, the edge's answers grow from 50 to 900 bytes, so that answering at the edge costs the
    first link more than a cloud answer does, and what each link costs per request flips: bytes per request
    answered at the edge jump, and the rates of the split alone would overspend. The first tier measures the
    bytes and moves its rate: each half spends the budget."""
    config = BudgetConfig(byte_budget=budget, links=2, fill_cap=min(1.0, 1.5 * budget), window=2000)
    tiers = [config.build() for _ in range(3)]
    rng = random.Random(11)
    device_rates = []
    for edge_reply in (50, 900):
        before = (tiers[0].forward_count("quiz"), tiers[0].decision_count("quiz"))
        served = [serve(tiers, rng, edge_reply) for _ in range(4000)]
        settled = served[500:]  # after the first few hundred requests of each half
        share = sum(s for s, _ in settled) / sum(c for _, c in settled)
        assert share == pytest.approx(budget, abs=0.02)
        forwards, decisions = tiers[0].forward_count("quiz") - before[0], tiers[0].decision_count("quiz") - before[1]
        device_rates.append(forwards / decisions)
    # Not the split's rates: the device forwards well above them while edge answers are cheap, and falls back
    # once they are dear.
    assert device_rates[0] > device_rates[1] + 0.1


def serve_priced(
    tiers: list[BudgetPolicy], rng: random.Random, middle_as_good_as_top: bool
) -> tuple[bool, int, int, bool]:
    """One request through device → edge → cloud, the verdict fed back to each tier it crossed as the tiers feed it
    (`observe_verdict`): (right, bytes spent, cloud-only bytes, whether the edge forwarded it). The device is right
    with probability its confidence, the cloud 90% of the time, the edge exactly when the cloud is or exactly when
    the device is; every link a request crosses carries 100 bytes up and 100 down."""
    device, edge, cloud = tiers
    c0, c1 = rng.random(), rng.random()
    device_right, cloud_right = rng.random() < c0, rng.random() < 0.9
    edge_right = cloud_right if middle_as_good_as_top else device_right
    first = device.decide("quiz", c0, is_last=False)
    if not first.forward:
        device.observe_cost("quiz", size=100, spent=())
        device.observe_verdict("quiz", c0, device_right, answered_here=True)
        return device_right, 0, 400, False
    second = edge.decide("quiz", c1, is_last=False, lower=(c0,), byte_price=first.byte_price)
    if second.forward:
        cloud.decide("quiz", rng.random(), is_last=True, lower=(c0, c1), byte_price=first.byte_price)
        edge.observe_cost("quiz", size=100, spent=[200], lower=(c0,))
        device.observe_cost("quiz", size=100, spent=[200, 200])
        edge.observe_verdict("quiz", c1, cloud_right, answered_here=False, probe_rate=second.probe_rate)
        device.observe_verdict("quiz", c0, cloud_right, answered_here=False)
        return cloud_right, 400, 400, True
    edge.observe_cost("quiz", size=100, spent=(), lower=(c0,))
    device.observe_cost("quiz", size=100, spent=[200])
    edge.observe_verdict("quiz", c1, edge_right, answered_here=True)
    device.observe_verdict("quiz", c0, edge_right, answered_here=False)
    return edge_right, 200, 400, False


def run_priced(tiers: list[BudgetPolicy], n: int, middle_as_good_as_top: bool, seed: int) -> tuple[float, float, float]:
    """(accuracy, bytes as a share of cloud-only, share of the edge's requests it forwarded) of the last half of `n`
    requests."""
    rng = random.Random(seed)
    served = [serve_priced(tiers, rng, middle_as_good_as_top) for _ in range(n)][n // 2 :]
    reached_edge = [s for s in served if s[1] > 0]
    return (
        float(np.mean([s[0] for s in served])),
        sum(s[1] for s in served) / sum(s[2] for s in served),
        float(np.mean([s[3] for s in reached_edge])),
    )


@pytest.mark.parametrize("middle_as_good_as_top", [True, False])
def test_the_price_split_learns_online_to_spend_on_the_link_that_pays(middle_as_good_as_top: bool) -> None:
    """Both chains start from the same fixed split (the device forwards 40%, the edge everything); the price split
    learns from the verdicts which link pays. With the edge as good as the cloud, the device forwards twice as much
    and the edge keeps what reaches it: the fixed split's accuracy is far behind. With an edge that knows no more
    than the device, the edge keeps forwarding nearly everything (about a point behind the fixed split: the edge
    keeps a share `explore` of its requests to measure its own answers)."""
    budget = 0.4
    fixed = BudgetConfig(byte_budget=budget, links=2, fill_cap=budget)
    assert split_budget(budget, 2, budget) == pytest.approx([0.4, 1.0])
    learned = [replace(fixed, link_split="price").build() for _ in range(3)]
    accuracy, spent, edge_forwards = run_priced(learned, 8000, middle_as_good_as_top, seed=3)
    assert spent == pytest.approx(budget, abs=0.02)
    fixed_accuracy, fixed_spent, _ = run_priced([fixed.build() for _ in range(3)], 8000, middle_as_good_as_top, seed=3)
    assert fixed_spent == pytest.approx(budget, abs=0.02)
    if middle_as_good_as_top:
        assert edge_forwards < MIN_RATE + 2 * fixed.explore
        assert accuracy > fixed_accuracy + 0.1
    else:
        assert edge_forwards > 0.8
        assert accuracy > fixed_accuracy - 0.02


@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_the_price_controller_holds_the_budget_when_the_better_link_changes_midway(budget: float) -> None:
    """For 6000 requests the edge answers as well as the cloud (the first link pays), then no better than the
    device (only the whole way up pays). The first tier's controller holds the bytes in each half, and the price
    moves the spending from one link to the other."""
    config = BudgetConfig(byte_budget=budget, links=2, link_split="price", window=2000)
    tiers = [config.build() for _ in range(3)]
    halves = [
        run_priced(tiers, 6000, middle_as_good_as_top, seed) for seed, middle_as_good_as_top in enumerate([True, False])
    ]
    for _, spent, _ in halves:
        assert spent == pytest.approx(budget, abs=0.02)
    (_, _, edge_before), (_, _, edge_after) = halves
    assert edge_before < 0.15
    assert edge_after > 0.7
