"""A whole cascade in one process, tiers linked through the wire encoding: for offline replay and tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from recserve.core.engine import Engine
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.metrics import Metrics
from recserve.core.offload import OffloadPolicy
from recserve.core.tier import Tier, new_request_id
from recserve.core.transport import InProcessUpstream
from recserve.core.validation import TierLimits


def link_tiers(
    names: Sequence[str],
    engines: Sequence[Engine],
    policies: Sequence[OffloadPolicy],
    *,
    registry: CollectorRegistry | None = None,
    limits: TierLimits | None = None,
    new_request_id: Callable[[], str] = new_request_id,
) -> list[Tier]:
    """Tiers first to last, each forwarding to the next through an InProcessUpstream (and taking forwarded
    requests from the one before), with no forward timeout: only a caller's own deadline limits a request."""
    if not len(names) == len(engines) == len(policies) or len(names) < 1:
        raise ValueError("one engine and one policy per tier name, at least one tier")
    metrics = Metrics(registry or CollectorRegistry())
    tiers: list[Tier] = []
    upstream: InProcessUpstream | None = None
    for index, (name, engine, policy) in reversed(list(enumerate(zip(names, engines, policies, strict=True)))):
        tier = Tier(
            name, engine, policy, metrics.for_tier(name), upstream, limits=limits, new_request_id=new_request_id,
            callers=(names[index - 1],) if index else (), forward_timeout=ForwardTimeout.unlimited(),
        )  # fmt: skip
        upstream = InProcessUpstream(tier)
        tiers.insert(0, tier)
    return tiers
