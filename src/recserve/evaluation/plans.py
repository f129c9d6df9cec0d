"""Policies as plans for a replay (offline policy objects and `recserve serve` flags, both from the policies'
configurations), and `recserve eval`'s run."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recserve.client.tally import Summary, summaries, summarise
from recserve.core.offload import OffloadPolicy
from recserve.core.traces import TraceQuery
from recserve.evaluation.replay import TraceReplay, cloud_only_by_benchmark, tune_fixed_thresholds
from recserve.evaluation.splits import calibrate_family_byte_priors, tune_family_fill_caps
from recserve.policies import (
    POLICY_ALIASES,
    POLICY_NAMES,
    BudgetConfig,
    FixedConfig,
    PolicyConfig,
    RecServeConfig,
    config_type,
    policy_options,
)

ORACLE = "oracle"  # the cheapest tier whose recorded answer is right: an offline bound, not a policy
EVAL_POLICY_NAMES = (*POLICY_NAMES, ORACLE)
# The policy options `recserve eval` takes: not those it sets itself from the chain (links) or per tier (thresholds).
EVAL_OPTIONS = tuple(option for option in policy_options() if option.in_eval)
# The β values RecServe is swept over, and chosen among on the train split to meet a byte budget.
DEFAULT_BETAS = tuple(round(float(b), 2) for b in np.linspace(0.0, 1.0, 21))


@dataclass(frozen=True)
class PolicyPlan:
    """A policy per tier: its configuration, as offline policy objects and as the `recserve serve` flags of each
    tier."""

    configs: list[PolicyConfig]
    offline: list[OffloadPolicy]

    @classmethod
    def of(cls, configs: Sequence[PolicyConfig]) -> PolicyPlan:
        """Both forms from one configuration per tier, first tier first."""
        return cls(list(configs), [config.build() for config in configs])

    @property
    def flags(self) -> list[list[str]]:
        return [config.serve_flags() for config in self.configs]

    @property
    def feedback(self) -> bool:
        """Whether runs send each request's verdict back as Feedback, for policies that learn from it."""
        return any(config.learns_from_feedback for config in self.configs)


# Options that are no setting of a policy but the target its tuning on the train split meets.
BUDGET_TARGETS: dict[type[PolicyConfig], set[str]] = {
    FixedConfig: {"byte_budget", "beta"},
    RecServeConfig: {"byte_budget"},
}


def check_options_taken(policy: str, options: Mapping[str, Any]) -> None:
    """Refuse options given on a command line that `policy` would ignore, saying which, rather than run without them.
    Some take a byte budget (or a β) as the target of what is chosen for them on the train split: fixed thresholds,
    and RecServe's β."""
    taken: set[str] = set()
    if policy != ORACLE:
        config = config_type(policy)
        taken = {spec.name for spec in config.options()} | BUDGET_TARGETS.get(config, set())
        if config is RecServeConfig and {"beta", "byte_budget"} <= set(options):
            raise ValueError(
                "the recserve policy takes --beta, or a --byte-budget that chooses its β on train, not both"
            )
    ignored = sorted(set(options) - taken)
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ValueError(f"the {policy} policy takes no {flags}; drop it, or choose a policy that does")


def chain_plan(config: PolicyConfig, tiers: int) -> PolicyPlan:
    """`config` on every tier of a chain of `tiers` (a target split over the chain's links)."""
    return PolicyPlan.of([config.for_chain(tiers)] * tiers)


def fixed_plan(
    tiers: int, thresholds: Sequence[float] = (), per_family: Mapping[str, Sequence[float]] | None = None
) -> PolicyPlan:
    """Fixed thresholds, one per forwarding tier (the default one when none are given), and one per tier and
    family when tuned; the last tier, which never forwards, keeps the default."""
    configs = []
    for depth in range(tiers - 1):
        families = tuple((family, values[depth]) for family, values in (per_family or {}).items())
        config = FixedConfig(family_thresholds=families)
        configs.append(replace(config, threshold=thresholds[depth]) if thresholds else config)
    return PolicyPlan.of([*configs, FixedConfig()])


@dataclass(frozen=True)
class EvalRequest:
    traces: Path
    chain: tuple[str, ...]
    split: str = "test"
    policy: str = "recserve"  # a policy's name or alias, or the oracle
    # Policy options by name (beta, window, byte_budget, ...; EVAL_OPTIONS), the policy's configuration giving the
    # others. Fixed thresholds without `thresholds` are tuned for `byte_budget` on the train split (by default
    # for what recserve at `beta` spends there).
    options: Mapping[str, Any] = field(default_factory=dict)
    thresholds: tuple[float, ...] = ()  # fixed: one per forwarding tier
    shuffle: int | None = None
    live: bool = False
    # The task families the traffic carries, which the budget policy's split is chosen for (`tune_family_fill_caps`);
    # empty: those of the evaluated split.
    served: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in (*EVAL_POLICY_NAMES, *POLICY_ALIASES):
            aliases = ", ".join(f"{alias} = {name}" for alias, name in POLICY_ALIASES.items())
            raise ValueError(
                f"unknown policy {self.policy!r}; choose one of: {', '.join(EVAL_POLICY_NAMES)} (aliases: {aliases})"
            )
        unknown = set(self.options) - {option.name for option in EVAL_OPTIONS}
        if unknown:
            raise ValueError(
                f"not options of an evaluated policy: {', '.join(sorted(unknown))}; "
                f"they are: {', '.join(option.name for option in EVAL_OPTIONS)}"
            )
        if self.policy != ORACLE:
            config_type(self.policy).from_values(self.options)  # says what is wrong before any trace is read


async def plan_for(request: EvalRequest, replay: TraceReplay) -> PolicyPlan:
    tiers = len(request.chain)
    config = config_type(request.policy)
    if config is BudgetConfig:
        budget_config = BudgetConfig.from_values(request.options).for_chain(tiers)
        train = replay.queries("train")
        if train:
            # What cloud-only serving costs each family, measured on the train split, so that the first tier
            # holds the bytes from the first request.
            budget_config = replace(budget_config, family_byte_priors=await calibrate_family_byte_priors(replay, train))
        if train and tiers > 2 and "fill_cap" not in request.options:
            # The split between links, per family, chosen on the train split for this budget and the families the
            # traffic carries (the policy holds the bytes online); without a train split, or with a fill cap given,
            # that fill cap.
            served = set(request.served) or {query.benchmark for query in replay.queries(request.split)}
            caps = tune_family_fill_caps(await replay.depth_table(train), budget_config.byte_budget, served=served)
            budget_config = replace(budget_config, family_fill_caps=caps)
        return chain_plan(budget_config, tiers)
    if config is RecServeConfig and "byte_budget" in request.options:
        train = replay.queries("train")
        if not train:
            raise ValueError("RecServe's β for a byte budget is chosen on the train split; this trace set has none")
        cloud_only = cloud_only_by_benchmark(await replay.depth_table(train))
        beta = beta_for_budget(await recserve_train_bytes(replay, train, cloud_only), request.options["byte_budget"])
        return chain_plan(RecServeConfig.from_values({**request.options, "beta": beta}), tiers)
    if config is not FixedConfig:
        return chain_plan(config.from_values(request.options), tiers)
    if request.thresholds:
        if len(request.thresholds) != tiers - 1:
            raise ValueError(f"--thresholds takes one value per forwarding tier: {tiers - 1} for this chain")
        return fixed_plan(tiers, request.thresholds)
    # Tune on the train split, apply to the evaluated split.
    train = replay.queries("train")
    if not train:
        raise ValueError("fixed thresholds without --thresholds are tuned on the train split; this trace set has none")
    train_table = await replay.depth_table(train)
    budget = request.options.get("byte_budget")
    if budget is None:
        # Compare at equal traffic: the budget is what RecServe with the same beta spends on train.
        recserve = chain_plan(RecServeConfig.from_values(request.options), tiers)
        outcomes = await replay.run_offline(train, recserve.offline)
        budget = summarise(outcomes, tiers, int(train_table.cloud_only_bytes.sum())).bytes_vs_cloud_only
    return fixed_plan(tiers, per_family=tune_fixed_thresholds(train_table, budget))


async def recserve_train_bytes(
    replay: TraceReplay, train: Sequence[TraceQuery], cloud_only: Mapping[str, int]
) -> dict[float, float]:
    """RecServe's bytes on the train split at each β of DEFAULT_BETAS, as a share of its cloud-only bytes (per
    benchmark: `cloud_only`)."""
    tiers = len(replay.chain)
    spent = {}
    for beta in DEFAULT_BETAS:
        outcomes = await replay.run_offline(train, chain_plan(RecServeConfig(beta=beta), tiers).offline)
        spent[beta] = summaries(outcomes, tiers, cloud_only)["overall"].bytes_vs_cloud_only
    return spent


def beta_for_budget(train_bytes: Mapping[float, float], budget: float) -> float:
    """The largest β whose bytes on the train split stay within `budget` (0 where none does)."""
    return max((beta for beta, spent in train_bytes.items() if spent <= budget + 1e-12), default=0.0)


async def evaluate(request: EvalRequest, log_dir: Path | None = None) -> dict[str, Summary]:
    """`recserve eval` without the printing: summaries per benchmark and overall."""
    replay = TraceReplay.load(request.traces, request.chain)
    queries = replay.queries(request.split, request.shuffle)
    if not queries:
        raise ValueError(f"no queries in split {request.split!r} of {request.traces}")
    table = await replay.depth_table(queries)
    cloud_only = cloud_only_by_benchmark(table)
    tiers = len(request.chain)
    if request.policy == ORACLE:
        if request.live:
            raise ValueError("the oracle knows the answers in advance: it is an offline bound, not a live policy")
        return summaries(table.outcomes(table.oracle_depths()), tiers, cloud_only)
    plan = await plan_for(request, replay)
    if request.live:
        if log_dir is None:
            raise ValueError("a live run needs a folder for the tier logs")
        outcomes = await asyncio.to_thread(replay.run_live, queries, plan.flags, log_dir, feedback=plan.feedback)
    else:
        outcomes = await replay.run_offline(queries, plan.offline, feedback=plan.feedback)
    return summaries(outcomes, tiers, cloud_only)
