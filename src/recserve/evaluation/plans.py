"""Policies as plans for a replay (offline policy objects and `recserve serve` flags), and `recserve eval`'s run."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recserve.client.tally import Summary, summaries, summarise
from recserve.core.offload import OffloadPolicy
from recserve.evaluation.replay import TraceReplay, cloud_only_by_benchmark, tune_fixed_thresholds
from recserve.policies.simple import ForwardAllPolicy, LocalOnlyPolicy

POLICY_NAMES = ("recserve", "casserve", "cloud-only", "device-only", "oracle", "budget", "quality")
# Policies that learn from verdicts: their runs send each recorded verdict back as Feedback.
FEEDBACK_POLICIES = ("quality",)


@dataclass(frozen=True)
class PolicyPlan:
    """A policy as offline policy objects and as the `recserve serve` flags of each tier."""

    offline: list[OffloadPolicy]
    flags: list[list[str]]


def recserve_plan(tiers: int, beta: float, window: int) -> PolicyPlan:
    from recserve.policies.simple import RecServePolicy

    flags = ["--policy", "recserve", "--beta", repr(beta), "--window", str(window)]
    return PolicyPlan([RecServePolicy(beta, window) for _ in range(tiers)], [flags] * tiers)


def fixed_plan(tiers: int, per_family: dict[str, tuple[float, ...]] | None, default: Sequence[float]) -> PolicyPlan:
    """Fixed thresholds per tier (and per family when tuned); the last tier keeps the default 0.5 it never uses."""
    from recserve.policies.simple import FixedThresholdPolicy

    offline: list[OffloadPolicy] = []
    flags: list[list[str]] = []
    for d in range(tiers):
        base = default[d] if d < tiers - 1 else 0.5
        families = {f: t[d] for f, t in (per_family or {}).items()} if d < tiers - 1 else {}
        offline.append(FixedThresholdPolicy(base, families))
        spec = ",".join(f"{f}={t!r}" for f, t in families.items())
        flags.append(["--policy", "fixed", "--threshold", repr(base), *(["--family-thresholds", spec] if spec else [])])
    return PolicyPlan(offline, flags)


def target_plan(name: str, tiers: int, target: float, window: int, fill_cap: float = 0.85) -> PolicyPlan:
    """`budget` (target: share of cloud-only bytes) or `quality` (target: accuracy share below cloud-only)."""
    from recserve.policies import make_policy

    value = "--byte-budget" if name == "budget" else "--quality-gap"
    flags = ["--policy", name, value, repr(target), "--window", str(window), "--links", str(tiers - 1)]
    flags += ["--fill-cap", repr(fill_cap)] if name == "budget" else []
    offline = [
        make_policy(name, byte_budget=target, quality_gap=target, window=window, links=tiers - 1, fill_cap=fill_cap)
        for _ in range(tiers)
    ]
    return PolicyPlan(offline, [flags] * tiers)


def simple_plan(name: str, tiers: int) -> PolicyPlan:
    if name == "cloud-only":
        return PolicyPlan([ForwardAllPolicy() for _ in range(tiers)], [["--policy", "forward-all"]] * tiers)
    return PolicyPlan([LocalOnlyPolicy() for _ in range(tiers)], [["--policy", "local"]] * tiers)


@dataclass(frozen=True)
class EvalRequest:
    traces: Path
    chain: tuple[str, ...]
    split: str = "test"
    policy: str = "recserve"
    beta: float = 0.3
    window: int = 10_000
    thresholds: tuple[float, ...] = ()
    budget: float | None = None
    shuffle: int | None = None
    live: bool = False
    gap: float = 0.02  # quality policy: accuracy share below cloud-only it may lose
    fill_cap: float = 0.85  # budget policy: most a lower link forwards before the links above get any


async def plan_for(request: EvalRequest, replay: TraceReplay) -> PolicyPlan:
    tiers = len(request.chain)
    if request.policy == "recserve":
        return recserve_plan(tiers, request.beta, request.window)
    if request.policy in ("cloud-only", "device-only"):
        return simple_plan(request.policy, tiers)
    if request.policy == "budget":
        share = 0.4 if request.budget is None else request.budget
        return target_plan("budget", tiers, share, request.window, request.fill_cap)
    if request.policy == "quality":
        return target_plan("quality", tiers, request.gap, request.window)
    if request.policy != "casserve":
        raise ValueError(f"unknown policy {request.policy!r}; choose one of: {', '.join(POLICY_NAMES)}")
    if request.thresholds:
        if len(request.thresholds) != tiers - 1:
            raise ValueError(f"--thresholds takes one value per forwarding tier: {tiers - 1} for this chain")
        return fixed_plan(tiers, None, request.thresholds)
    # Tune on the train split, apply to the evaluated split.
    train = replay.queries("train")
    if not train:
        raise ValueError("casserve without --thresholds tunes on the train split, and this trace set has none")
    train_table = await replay.depth_table(train)
    budget = request.budget
    if budget is None:
        # Compare at equal traffic: the budget is what RecServe with the same beta spends on train.
        outcomes = await replay.run_offline(train, recserve_plan(tiers, request.beta, request.window).offline)
        budget = summarise(outcomes, tiers, int(train_table.cloud_only_bytes.sum())).bytes_vs_cloud_only
    return fixed_plan(tiers, tune_fixed_thresholds(train_table, budget), [0.5] * (tiers - 1))


async def evaluate(request: EvalRequest, log_dir: Path | None = None) -> dict[str, Summary]:
    """`recserve eval` without the printing: summaries per benchmark and overall."""
    replay = TraceReplay.load(request.traces, request.chain)
    queries = replay.queries(request.split, request.shuffle)
    if not queries:
        raise ValueError(f"no queries in split {request.split!r} of {request.traces}")
    table = await replay.depth_table(queries)
    cloud_only = cloud_only_by_benchmark(table)
    tiers = len(request.chain)
    if request.policy == "oracle":
        if request.live:
            raise ValueError("the oracle knows the answers in advance: it is an offline bound, not a live policy")
        return summaries(table.outcomes(table.oracle_depths()), tiers, cloud_only)
    plan = await plan_for(request, replay)
    feedback = request.policy in FEEDBACK_POLICIES
    if request.live:
        if log_dir is None:
            raise ValueError("a live run needs a folder for the tier logs")
        outcomes = await asyncio.to_thread(replay.run_live, queries, plan.flags, log_dir, feedback=feedback)
    else:
        outcomes = await replay.run_offline(queries, plan.offline, feedback=feedback)
    return summaries(outcomes, tiers, cloud_only)
