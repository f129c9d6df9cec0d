"""The placement simulator: deterministic, every policy fine at a low rate, CS-UCB ahead at a high one, queues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.core.traces import BUNDLED_TRACE
from recserve.evaluation.placement_sim import (
    ServiceClass,
    SimConfig,
    fixed_sizes,
    main,
    simulate,
    sweep,
    trace_sizes,
)
from recserve.policies import PLACEMENT_NAMES

# Small enough to run in a fraction of a second: ten sites (three of them weak boxes), one cloud.
SMALL = SimConfig(sites=10, clouds=1, duration=120.0, warmup=40.0)


def test_the_simulator_is_deterministic_with_a_seed() -> None:
    first = simulate("random", 60.0, SMALL)
    assert simulate("random", 60.0, SMALL) == first
    other = simulate("random", 60.0, SimConfig(sites=10, clouds=1, duration=120.0, warmup=40.0, seed=1))
    assert other != first


@pytest.mark.parametrize("policy", PLACEMENT_NAMES)
def test_at_a_low_rate_every_policy_meets_nearly_all_requirements(policy: str) -> None:
    config = SimConfig(sites=6, clouds=1, weak_share=0.0, duration=120.0, warmup=30.0,
                       classes=(ServiceClass("standard", 1.0, 20.0),))  # fmt: skip
    result = simulate(policy, 5.0, config)
    assert result.forwarded > 100
    assert result.met >= 0.97
    assert result.unfinished == result.refused == 0


def test_at_a_high_rate_cs_ucb_meets_more_than_random_and_round_robin_and_spends_less_than_cloud_only() -> None:
    results = {policy: simulate(policy, 120.0, SMALL) for policy in ("cs-ucb", "random", "round-robin", "cloud-only")}
    assert results["cs-ucb"].met > results["random"].met + 0.1
    assert results["cs-ucb"].met > results["round-robin"].met + 0.1
    assert results["cs-ucb"].met > results["cloud-only"].met
    assert results["cs-ucb"].energy_joules < results["cloud-only"].energy_joules


def test_the_queue_grows_when_arrivals_exceed_capacity() -> None:
    # Slots without limit: the tiers refuse nothing, so the servers' queues take the excess.
    config = SimConfig(sites=2, clouds=1, weak_share=0.0, duration=60.0, warmup=10.0, drain=1.0, slots=1_000_000)
    overloaded = simulate("round-robin", 400.0, config)  # 120 forwarded per second against ~32 served
    assert list(overloaded.queue) == sorted(overloaded.queue)
    assert overloaded.queue[-1] > 2 * overloaded.queue[1] > 0
    assert overloaded.unfinished > 0
    assert overloaded.refused == 0
    assert overloaded.met < 0.5
    assert max(simulate("round-robin", 10.0, config).queue) <= 2


def test_sizes_from_a_trace_or_a_fixed_distribution() -> None:
    sizes = trace_sizes(BUNDLED_TRACE)
    assert len(sizes) > 1000
    assert all(tokens_in > 0 and tokens_out > 0 for tokens_in, tokens_out in sizes)
    assert fixed_sizes(seed=3) == fixed_sizes(seed=3) != fixed_sizes(seed=4)
    result = sweep(["cs-ucb", "first"], [30.0, 60.0], SMALL, sizes)
    assert len(result.results) == 4
    assert result.sustained("cs-ucb") in (0.0, 30.0, 60.0)


def test_cli_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.json"
    args = ["--sites", "4", "--clouds", "1", "--rates", "10,20", "--policies", "cs-ucb,cloud-only",
            "--duration", "30", "--warmup", "10", "--placement-delta", "0.5", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    for word in ("cs-ucb", "cloud-only", "sustain"):
        assert word in table
    document = json.loads(out.read_text())
    assert document["options"] == {"placement_delta": 0.5}
    assert {item["policy"] for item in document["results"]} == {"cs-ucb", "cloud-only"}
    assert set(document["sustained"]) == {"cs-ucb", "cloud-only"}
