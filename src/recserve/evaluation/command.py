"""`recserve eval`: replay a trace set through the tier code and report accuracy and bytes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from recserve.client.tally import format_table, summary_columns
from recserve.client.trace_client import tier_names
from recserve.evaluation.plans import (
    DEFAULT_BETAS,
    EVAL_OPTIONS,
    EVAL_POLICY_NAMES,
    ORACLE,
    EvalRequest,
    check_options_taken,
    evaluate,
)
from recserve.evaluation.sweep import SweepRequest, plot, sweep
from recserve.policies import POLICY_ALIASES, RecServeConfig

# The flags these options had before `recserve eval` took the names `recserve serve` gives them.
FLAG_ALIASES = {"byte_budget": ("--budget",), "quality_gap": ("--gap",)}
FLAG_NOTES = {
    "byte_budget": "; fixed without --thresholds: the byte share its thresholds are tuned for on the train split "
    "(default: what recserve at --beta spends there); recserve, instead of --beta: the largest β whose bytes on the "
    "train split stay within it",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", type=Path, required=True, help="a folder in the trace format (docs/traces.md)")
    parser.add_argument("--chain", required=True, help="models from cheapest to largest, e.g. llama3.2-1b,llama3.1-70b")
    parser.add_argument("--split", default="test")
    aliases = ", ".join(f"{alias} = {name}" for alias, name in POLICY_ALIASES.items())
    parser.add_argument(
        "--policy", choices=(*EVAL_POLICY_NAMES, *POLICY_ALIASES), default="recserve",
        help=f"the policy every tier runs, or {ORACLE} (an offline bound); aliases {aliases}",
    )  # fmt: skip
    parser.add_argument("--thresholds", default="", help="fixed: one per forwarding tier; default: tuned on train")
    add_policy_options(parser)
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="serve queries in a seeded order")
    parser.add_argument("--live", action="store_true", help="through real tier processes over gRPC on loopback")
    parser.add_argument("--json", default=None, metavar="FILE|-", help="write the figures as JSON")
    parser.add_argument("--sweep", action="store_true", help="the accuracy-versus-bytes frontier instead")
    parser.add_argument("--plot", type=Path, default=None, help="with --sweep: write the frontier as a PNG")
    parser.add_argument("--betas", default=",".join(map(str, DEFAULT_BETAS)), help="with --sweep: the β values")


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """A flag per policy option `recserve eval` takes (`given_options` reads them back)."""
    for option in EVAL_OPTIONS:
        # Left out unless given, so that the policy's configuration supplies its defaults.
        parser.add_argument(
            option.flag, *FLAG_ALIASES.get(option.name, ()), dest=option.name, type=option.parse,
            default=argparse.SUPPRESS,
            help=f"{option.help} (default {option.format(option.default)}){FLAG_NOTES.get(option.name, '')}",
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    chain = tuple(m.strip() for m in args.chain.split(",") if m.strip())
    options = given_options(args)
    try:
        if args.sweep:
            return _sweep(args, chain, options.get("window", RecServeConfig().window))
        check_options_taken(args.policy, options)
        thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
        request = EvalRequest(
            traces=args.traces, chain=chain, split=args.split, policy=args.policy, options=options,
            thresholds=thresholds, shuffle=args.shuffle, live=args.live,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="recserve-eval-") as logs:
            results = asyncio.run(evaluate(request, Path(logs)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"recserve eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(results, summary_columns(tier_names(len(chain)))))
    if args.json:
        _write_json({name: s.as_json() for name, s in results.items()}, args.json)
    return 0


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The policy options given on the command line, by name."""
    return {option.name: getattr(args, option.name) for option in EVAL_OPTIONS if hasattr(args, option.name)}


def _sweep(args: argparse.Namespace, chain: tuple[str, ...], window: int) -> int:
    betas = tuple(float(b) for b in args.betas.split(","))
    request = SweepRequest(args.traces, chain, args.split, window, betas, shuffle=args.shuffle)
    result = asyncio.run(sweep(request))
    if args.plot:
        plot(result, args.plot)
    _write_json(result.to_json(), args.json or "-")
    return 0


def _write_json(data: object, target: str) -> None:
    text = json.dumps(data, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")
