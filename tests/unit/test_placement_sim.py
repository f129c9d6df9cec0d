"""The placement simulator: deterministic, every policy fine at a low rate, CS-UCB ahead at a high one, queues."""

from __future__ import annotations

import json
import random
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import simpy

from recserve.core.traces import BUNDLED_TRACE
from recserve.engines.profiles import PROFILES, ServerProfile
from recserve.evaluation.placement_sim import (
    CLOUD_SERVING,
    SWEPT_PLACEMENTS,
    LiveSetup,
    ServiceClass,
    SimConfig,
    _Server,
    fixed_sizes,
    main,
    poisson_arrivals,
    simulate,
    simulate_live,
    sweep,
    trace_sizes,
)

# Small enough to run in a fraction of a second: ten sites (three of them edge-box, the rest edge-gpu), one cloud
# region of eight cloud-gpu servers.
SMALL = SimConfig(sites=10, clouds=1, duration=120.0, warmup=40.0)


def test_the_simulator_is_deterministic_with_a_seed() -> None:
    first = simulate("random", 60.0, SMALL)
    assert simulate("random", 60.0, SMALL) == first
    other = simulate("random", 60.0, SimConfig(sites=10, clouds=1, duration=120.0, warmup=40.0, seed=1))
    assert other != first


@pytest.mark.parametrize("policy", SWEPT_PLACEMENTS)
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
    # Slots without limit: the tiers refuse nothing, so the servers' queues take the excess. Two edge-box sites and
    # one cloud-gpu serve about 2 + 2 + 3 requests a second of the fixed sizes (64 tokens out on average).
    config = SimConfig(sites=2, clouds=1, weak_share=1.0, cloud_replicas=1, duration=60.0, warmup=10.0, drain=1.0,
                       slots=1_000_000)  # fmt: skip
    overloaded = simulate("round-robin", 100.0, config)  # 30 forwarded per second against ~7 served
    assert list(overloaded.queue) == sorted(overloaded.queue)
    assert overloaded.queue[-1] > 2 * overloaded.queue[1] > 0
    assert overloaded.unfinished > 0
    assert overloaded.refused == 0
    assert overloaded.met < 0.5
    assert max(simulate("round-robin", 4.0, config).queue) <= 2


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


def _served(profile: ServerProfile, replicas: int, jobs: list[tuple[float, int, int]]) -> list[tuple[float, float]]:
    """(finish time, joules above idle) of each (arrival, tokens_in, tokens_out) at one simulated server."""
    env = simpy.Environment()
    server = _Server(env, profile, replicas)
    finished: list[tuple[float, float]] = [(0.0, 0.0)] * len(jobs)

    def one(index: int, at: float, tokens_in: int, tokens_out: int) -> Generator[Any, Any, None]:
        yield env.timeout(at)
        job = server.submit(tokens_in, tokens_out)
        yield job.done
        finished[index] = (env.now, job.energy)

    for index, (at, tokens_in, tokens_out) in enumerate(jobs):
        env.process(one(index, at, tokens_in, tokens_out))
    env.run()
    return finished


def test_a_server_takes_the_emulated_engines_time_and_energy() -> None:
    profile = PROFILES["edge-box"]  # batch limit 8, alpha 0.29: the batch matters
    above = [profile.watts(b) - profile.idle_watts for b in range(profile.batch_limit + 1)]
    prefill = profile.prefill_seconds(100)
    # Alone: the prefill, then one step at batch 1 per token.
    [(seconds, joules)] = _served(profile, 1, [(0.0, 100, 10)])
    assert seconds == pytest.approx(prefill + 10 * profile.step_seconds(1))
    assert joules == pytest.approx(prefill * above[1] + 10 * profile.step_seconds(1) * above[1])
    # A full batch at once: every step at batch 8, its power above idle shared by 8; a ninth waits in the queue for
    # the first place to free, then runs alone.
    results = _served(profile, 1, [(0.0, 100, 10)] * 9)
    batch = profile.batch_limit
    together = prefill + 10 * profile.step_seconds(batch)
    for seconds, joules in results[:batch]:
        assert seconds == pytest.approx(together)
        assert joules == pytest.approx(prefill * above[1] + 10 * profile.step_seconds(batch) / batch * above[batch])
    assert results[batch][0] == pytest.approx(together + prefill + 10 * profile.step_seconds(1))
    # Replicas: the batch is per replica, so 8 requests over 8 replicas each run at batch 1.
    spread = _served(profile, 8, [(0.0, 100, 10)] * 8)
    assert all(seconds == pytest.approx(prefill + 10 * profile.step_seconds(1)) for seconds, _ in spread)


def test_poisson_arrivals_are_the_bench_s_original_draws() -> None:
    items = list(range(50))
    arrivals = poisson_arrivals(8.0, 20.0, 3, items)
    # The draws bench/placement_bench.py made inline before it called poisson_arrivals.
    rng, clock, expected = random.Random(3), 0.0, []
    while True:
        clock += rng.expovariate(8.0)
        if clock > 20.0:
            break
        draw = rng.random()
        name = "interactive" if draw < 0.8 else "batch"
        expected.append((clock, name, rng.choice(items)))
    assert [(a.seconds, a.service.name, a.item) for a in arrivals] == expected
    assert {a.service.name: a.service.requirement_seconds for a in arrivals} == {"interactive": 1.5, "batch": 10.0}


def test_the_live_setup_replays_the_tiers_decisions() -> None:
    setup = LiveSetup(seconds=5.0, warmup=2.0)
    first = simulate_live("first", [8.0, 16.0], setup)
    assert [point.rate for point in first] == [8.0, 16.0]
    assert first == simulate_live("first", [8.0, 16.0], setup)
    for point in first:
        shares = dict(point.shares)
        assert set(shares) == {"device", "edge-a"}  # the plain cascade: the first candidate only
        assert 0.4 < shares["device"] < 0.6  # RecServe at beta 0.5 forwards about half
        assert point.met > 0.9
        assert point.p95_seconds < 1.5
        assert point.joules_per_request > 0
    spread = simulate_live("cs-ucb", [8.0], setup)[0]
    assert {"edge-b", "cloud"} & set(dict(spread.shares))  # tries its other candidates
    assert dict(spread.shares)["device"] == dict(first[0].shares)["device"]  # the device decides alike
    (pinned,) = simulate_live("pinned", [8.0], setup, {"placement_pin": "edge-b"})
    assert set(dict(pinned.shares)) == {"device", "edge-b"}
    assert dict(pinned.shares)["device"] == dict(first[0].shares)["device"]


def test_the_live_setup_simulates_cloud_only_serving_the_energy_goals_reference() -> None:
    """Every request straight to the cloud, no device generation: the most accurate and the dearest per request."""
    setup = LiveSetup(seconds=5.0, warmup=2.0, policy_beta=0.3)
    (serving,) = simulate_live(CLOUD_SERVING, [8.0], setup)
    (cascade,) = simulate_live("cs-ucb", [8.0], setup)
    assert dict(serving.shares) == {"cloud": 1.0}
    assert serving.requests == cascade.requests
    assert serving.accuracy > cascade.accuracy
    assert serving.joules_per_request > 2 * cascade.joules_per_request
    with pytest.raises(SystemExit):
        main(["--policies", CLOUD_SERVING, "--rates", "8"])  # not a placement of the 50-site sweep


def test_cli_simulates_the_live_setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "live.json"
    args = ["--live-setup", "--policies", "first", "--rates", "8", "--seconds", "3", "--warmup", "1",
            "--hop-overhead", "0.003", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "edge-a" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["setup"]["hop_overhead_seconds"] == 0.003
    assert [item["rate"] for item in document["results"]] == [8.0]
