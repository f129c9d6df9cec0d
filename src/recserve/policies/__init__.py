"""Offload policies: given a tier's confidence, answer here or forward to the next tier.

Implements `recserve.core.offload.OffloadPolicy`. May import `recserve.core` only: the tiers, the live servers
and the offline replay all build their policies here.
"""

from __future__ import annotations

from collections.abc import Mapping

from recserve.core.offload import OffloadPolicy
from recserve.policies.budget import BudgetPolicy
from recserve.policies.quality import QualityPolicy
from recserve.policies.simple import FixedThresholdPolicy, ForwardAllPolicy, LocalOnlyPolicy, RecServePolicy

POLICY_NAMES = ("recserve", "fixed", "forward-all", "local", "budget", "quality")


def make_policy(
    name: str,
    *,
    beta: float = 0.3,
    window: int = 10_000,
    threshold: float = 0.5,
    family_thresholds: Mapping[str, float] | None = None,
    byte_budget: float = 0.4,
    quality_gap: float = 0.02,
    links: int = 2,
    fill_cap: float = 0.85,
    explore: float = 0.05,
    cold_rate: float = 0.5,
    seed: int = 0,
) -> OffloadPolicy:
    if name in ("budget", "quality"):
        if name == "budget":
            return BudgetPolicy(byte_budget, links=links, fill_cap=fill_cap, window=window)
        return QualityPolicy(quality_gap, links=links, window=window, explore=explore, cold_rate=cold_rate, seed=seed)
    if name == "recserve":
        return RecServePolicy(beta, window)
    if name == "fixed":
        return FixedThresholdPolicy(threshold, family_thresholds)
    if name == "forward-all":
        return ForwardAllPolicy()
    if name == "local":
        return LocalOnlyPolicy()
    raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
