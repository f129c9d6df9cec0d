"""`recserve calibrate`: choose on a labelled calibration set what a policy must learn before it serves, and write
each tier's settings for a deployment.

The budget policy's split between links (a fill cap per family, for chains of three or more tiers) and its byte
priors, CasServe's thresholds, and RecServe's β where a byte budget is given instead, are chosen on labelled queries
of the chain's own traffic. `recserve eval` and the chain study choose them on a trace set's train split; this
command makes the same choice (`plans.plan_for`) and writes it as the RECSERVE_* variables of each tier, so that live
tiers run exactly the policy that was evaluated.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

from recserve.client.trace_client import tier_names
from recserve.evaluation.command import add_policy_options, given_options
from recserve.evaluation.plans import EvalRequest, check_options_taken, plan_for
from recserve.evaluation.replay import TraceReplay
from recserve.policies import POLICY_ALIASES, POLICY_NAMES, BudgetConfig, PolicyConfig, config_type
from recserve.server.settings import ENV_PREFIX, Option

# The labelled queries a calibration chooses on: the trace format's train split (docs/traces.md).
CALIBRATION_SPLIT = "train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--traces", type=Path, required=True,
        help="the chain's labelled calibration queries in the trace format (docs/traces.md), as its train split",
    )  # fmt: skip
    parser.add_argument("--chain", required=True, help="models from cheapest to largest, e.g. llama3.2-1b,llama3.1-70b")
    parser.add_argument(
        "--policy", choices=(*POLICY_NAMES, *POLICY_ALIASES), default="budget", help="the policy every tier runs"
    )
    add_policy_options(parser)
    parser.add_argument(
        "--families", default="",
        help="budget: the task families the deployment serves, which the split between links is chosen for, e.g. "
        "mmlu,triviaqa (default: every family of the calibration set)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write TIER.env per tier (device, edge, cloud, ...) into this folder; default: print them",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    chain = tuple(model.strip() for model in args.chain.split(",") if model.strip())
    options = given_options(args)
    try:
        check_options_taken(args.policy, options)
        served = tuple(family.strip() for family in args.families.split(",") if family.strip())
        if served and config_type(args.policy) is not BudgetConfig:
            raise ValueError(f"--families chooses the budget policy's split; the {args.policy} policy has none")
        request = EvalRequest(
            traces=args.traces, chain=chain, split=CALIBRATION_SPLIT, policy=args.policy, options=options, served=served
        )
        configs, calibration = asyncio.run(calibrate(request))
    except (ValueError, FileNotFoundError) as exc:
        print(f"recserve calibrate: {exc}", file=sys.stderr)
        return 2
    files = {
        tier: env_file(config, f"the {tier} tier ({model}) of {' -> '.join(chain)}, chosen on {calibration}")
        for tier, model, config in zip(tier_names(len(chain)), chain, configs, strict=True)
    }
    if args.out is None:
        print("\n".join(files.values()), end="")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for tier, text in files.items():
        (args.out / f"{tier}.env").write_text(text)
        print(args.out / f"{tier}.env")
    return 0


async def calibrate(request: EvalRequest) -> tuple[list[PolicyConfig], str]:
    """Each tier's policy configuration, first tier first, with what it needs chosen on the calibration split; and
    what that split held, in words."""
    if len(request.chain) < 2:
        raise ValueError("a chain has at least two models, cheapest first")
    replay = TraceReplay.load(request.traces, request.chain)
    queries = replay.queries(request.split)
    if not queries:
        raise ValueError(
            f"no labelled queries in the {request.split!r} split of {request.traces}: calibration chooses on them "
            "(docs/traces.md, column split)"
        )
    families = Counter(query.benchmark for query in queries)
    unknown = sorted(set(request.served) - set(families))
    if unknown:
        raise ValueError(
            f"no calibration queries of {', '.join(unknown)}; the {request.split!r} split of {request.traces} has "
            f"{', '.join(sorted(families))}"
        )
    held = ", ".join(f"{family} {count}" for family, count in sorted(families.items()))
    return (await plan_for(request, replay)).configs, f"{len(queries)} labelled queries ({held})"


def env_file(config: PolicyConfig, description: str) -> str:
    """The policy of one tier as RECSERVE_* variables, in the env-file format of Docker Compose and Kubernetes, under
    a comment that says what it is (`description`)."""
    lines = [f"# recserve calibrate, {config.name} policy: {description}", f"{ENV_PREFIX}POLICY={config.name}"]
    lines += [f"{Option.of_policy(spec).env}={spec.format(getattr(config, spec.name))}" for spec in config.options()]
    return "\n".join(lines) + "\n"
