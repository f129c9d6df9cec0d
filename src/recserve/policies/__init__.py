"""Offload policies: given a tier's confidence, answer here or forward to the next tier; placement policies: which of
the next-tier candidates a forwarded request goes to (recserve.policies.placement); and the progressive scheduler:
sketch at the cloud and expand here, forward whole, or answer here (recserve.policies.progressive, with the sketch
router of recserve.policies.sketch_router).

Implements `recserve.core.offload.OffloadPolicy`. May import `recserve.core` only: the tiers, the live servers
and the offline replay all build their policies here, each from its frozen configuration (`PolicyConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from recserve.policies.budget import BudgetConfig
from recserve.policies.config import PolicyConfig, PolicyOption
from recserve.policies.placement import (
    DEFAULT_PLACEMENT,
    PLACEMENT_CONFIGS,
    PLACEMENT_NAMES,
    PlacementConfig,
    placement_config,
    placement_config_type,
    placement_options,
)
from recserve.policies.quality import QualityConfig
from recserve.policies.simple import FixedConfig, ForwardAllConfig, LocalConfig, RecServeConfig

POLICY_CONFIGS: tuple[type[PolicyConfig], ...] = (
    RecServeConfig,
    FixedConfig,
    ForwardAllConfig,
    LocalConfig,
    BudgetConfig,
    QualityConfig,
)
POLICY_NAMES = tuple(config.name for config in POLICY_CONFIGS)
POLICY_ALIASES = {alias: config.name for config in POLICY_CONFIGS for alias in config.aliases}


def config_type(name: str) -> type[PolicyConfig]:
    """The configuration class of the policy called `name` (or one of its aliases)."""
    for config in POLICY_CONFIGS:
        if name == config.name or name in config.aliases:
            return config
    aliases = ", ".join(f"{alias} = {policy}" for alias, policy in POLICY_ALIASES.items())
    raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)} (aliases: {aliases})")


def policy_config(name: str, values: Mapping[str, Any]) -> PolicyConfig:
    """The configuration of policy `name` from the values of its options in `values`, defaults for the others."""
    return config_type(name).from_values(values)


def policy_options() -> tuple[PolicyOption, ...]:
    """Every policy option once, in the order the policies list them; each one's help names the policies that
    take it (several share `window` and `links`)."""
    options: dict[str, PolicyOption] = {}
    takers: dict[str, list[str]] = {}
    for config in POLICY_CONFIGS:
        for option in config.options():
            if options.setdefault(option.name, option) != option:
                raise TypeError(f"the {config.name} policy's {option.name} differs from another policy's")
            takers.setdefault(option.name, []).append(config.name)
    return tuple(replace(option, help=f"{_policies(takers[name])}: {option.help}") for name, option in options.items())


def _policies(names: list[str]) -> str:
    if len(names) == 1:
        return f"{names[0]} policy"
    return f"{', '.join(names[:-1])} and {names[-1]} policies"


__all__ = [
    "DEFAULT_PLACEMENT",
    "PLACEMENT_CONFIGS",
    "PLACEMENT_NAMES",
    "POLICY_ALIASES",
    "POLICY_CONFIGS",
    "POLICY_NAMES",
    "BudgetConfig",
    "FixedConfig",
    "ForwardAllConfig",
    "LocalConfig",
    "PlacementConfig",
    "PolicyConfig",
    "PolicyOption",
    "QualityConfig",
    "RecServeConfig",
    "config_type",
    "placement_config",
    "placement_config_type",
    "placement_options",
    "policy_config",
    "policy_options",
]
