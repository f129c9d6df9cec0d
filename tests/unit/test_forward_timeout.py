"""The forward timeout follows the next tier's latency within its bounds, and the tier gives the next tier exactly
that long; time is a fake clock that the fake next tier advances."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from recserve.core.breaker import CircuitBreaker
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.core.transport import Reply
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.policies.simple import ForwardAllPolicy
from recserve.v1 import tier_pb2 as pb


def test_the_ceiling_holds_until_enough_latencies_are_known() -> None:
    timeout = ForwardTimeout(ceiling=30.0, floor=1.0, factor=3.0, min_samples=5)
    for _ in range(4):
        timeout.observe(2.0)
        assert timeout.seconds == 30.0
    timeout.observe(2.0)
    assert timeout.seconds == 6.0
    assert timeout.slow_after == 3.0


def test_it_follows_a_high_percentile_of_recent_latencies() -> None:
    timeout = ForwardTimeout(ceiling=30.0, floor=0.1, factor=2.0, quantile=0.9, window=10, min_samples=10)
    for seconds in (1.0,) * 9 + (4.0,):
        timeout.observe(seconds)
    assert timeout.seconds == 2.0  # the 90th percentile of ten is the ninth: 1 s
    timeout.observe(4.0)
    assert timeout.seconds == 8.0  # two slow answers of the last ten
    for _ in range(10):
        timeout.observe(0.5)
    assert timeout.seconds == 1.0  # the slow ones left the window


def test_it_stays_within_its_bounds() -> None:
    timeout = ForwardTimeout(ceiling=5.0, floor=1.0, factor=3.0, min_samples=1)
    timeout.observe(0.001)
    assert timeout.seconds == 1.0
    timeout.observe(60.0)
    assert timeout.seconds == 5.0


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError, match="floor <= ceiling"):
        ForwardTimeout(ceiling=1.0, floor=2.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedUpstream:
    """A next tier that takes `latency` seconds of the fake clock and records the timeout each call was given."""

    def __init__(self, clock: Clock, latency: float) -> None:
        self.clock, self.latency = clock, latency
        self.timeouts: list[float | None] = []

    async def infer(self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False) -> Reply:
        self.timeouts.append(timeout)
        self.clock.now += self.latency
        response = pb.InferResponse(answer="up", answered_by="edge", hops=[*request.hops, pb.Hop(tier="edge")])
        return Reply(response, request.ByteSize(), response.ByteSize())


async def test_the_tier_gives_the_next_tier_the_adapted_timeout(trace_folder: Path) -> None:
    clock = Clock()
    engine = create_engine("replay", EngineConfig(traces=str(trace_folder), trace_model="small"))
    await engine.start()
    upstream = TimedUpstream(clock, latency=0.2)
    tier = Tier(
        "device", engine, ForwardAllPolicy(), TierMetrics.standalone(CollectorRegistry(), "device"), upstream,
        breaker=CircuitBreaker(clock), forward_timeout=ForwardTimeout(ceiling=30.0, floor=0.5, min_samples=20),
        clock=clock,
    )  # fmt: skip
    request = pb.InferRequest(prompt="quiz question number 1?", task=pb.TASK_KIND_CHOICE, options=list("ABCD"))
    for _ in range(21):
        response = await tier.infer(request)
        assert response.answered_by == "edge"
        request.request_id = ""
    assert upstream.timeouts[:20] == [30.0] * 20
    assert upstream.timeouts[20] == pytest.approx(0.6)  # 3 times 0.2 s
    # A caller's deadline shorter than that gives the next tier 90% of what is left, for an answer here after.
    await tier.infer(request, timeout=0.5)
    assert upstream.timeouts[-1] == pytest.approx(0.45)
