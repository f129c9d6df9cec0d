"""The trace client over gRPC to three real tiers in this process gets the outcomes it gets in process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from recserve.client.trace_client import TraceClient, tier_names
from recserve.core.cascade import link_tiers
from recserve.core.traces import TraceSet
from recserve.engines.replay import ReplayEngine
from recserve.policies.simple import RecServeConfig, RecServePolicy
from recserve.server.app import RunningTier, start_tier
from recserve.server.settings import TierSettings
from tests.conftest import TRACE_MODELS

BETA, WINDOW = 0.4, 8


async def start_stack(folder: Path) -> list[RunningTier]:
    tiers: list[RunningTier] = []
    next_address = ""
    names = tier_names(3)
    for index, model in reversed(list(enumerate(TRACE_MODELS))):
        settings = TierSettings.with_defaults(
            tier=names[index], host="127.0.0.1", port=0, next=next_address, engine="replay", traces=str(folder),
            trace_model=model, plaintext=True, policy="recserve", beta=BETA, window=WINDOW,
            callers=names[index - 1] if index else "",
        )  # fmt: skip
        tiers.insert(0, await start_tier(settings))
        next_address = tiers[0].address
    return tiers


def verdicts_counted(tiers: list[RunningTier]) -> Counter[tuple[str, bool]]:
    counted: Counter[tuple[str, bool]] = Counter()
    for running in tiers:
        for metric in running.registry.collect():
            for sample in metric.samples:
                if sample.name == "recserve_judged_answers_total":
                    counted[(sample.labels["tier"], sample.labels["verdict"] == "right")] += int(sample.value)
    return counted


async def test_offline_and_over_grpc_the_same_outcomes_and_feedback(trace_folder: Path) -> None:
    traces = TraceSet.load(trace_folder)
    client = TraceClient(traces, TRACE_MODELS)
    engines = [ReplayEngine(trace_folder, model) for model in TRACE_MODELS]
    for engine in engines:
        await engine.start()
    try:
        linked = link_tiers(
            client.names, engines, [RecServePolicy(RecServeConfig(beta=BETA, window=WINDOW)) for _ in engines]
        )
        offline = await client.run(linked[0], traces.queries, feedback=True)
    finally:
        for engine in engines:
            await engine.shutdown()

    live_tiers = await start_stack(trace_folder)
    try:
        live = await client.run_live(live_tiers[0].address, traces.queries, feedback=True)
        counted = verdicts_counted(live_tiers)
    finally:
        for running in live_tiers:
            await running.stop(grace=1)

    assert live == offline
    assert {o.depth for o in live} == {0, 1, 2}
    # Every verdict went back over gRPC and was recorded by the tier that answered.
    assert counted == Counter((client.names[o.depth], bool(o.correct)) for o in live)
