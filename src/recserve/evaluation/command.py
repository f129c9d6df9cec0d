"""`recserve eval`: replay a trace set through the tier code and report accuracy and bytes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from recserve.client.tally import format_table, summary_columns
from recserve.client.trace_client import tier_names
from recserve.evaluation.plans import POLICY_NAMES, EvalRequest, evaluate
from recserve.evaluation.sweep import DEFAULT_BETAS, SweepRequest, plot, sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", type=Path, required=True, help="a folder in the trace format (docs/traces.md)")
    parser.add_argument("--chain", required=True, help="models from cheapest to largest, e.g. llama3.2-1b,llama3.1-70b")
    parser.add_argument("--split", default="test")
    parser.add_argument("--policy", choices=POLICY_NAMES, default="recserve")
    parser.add_argument("--beta", type=float, default=0.3, help="recserve: forward below this quantile")
    parser.add_argument("--window", type=int, default=10_000, help="recserve: confidences kept per benchmark")
    parser.add_argument("--thresholds", default="", help="casserve: one per forwarding tier; default: tuned on train")
    parser.add_argument(
        "--budget", type=float, default=None,
        help="casserve tuning, and the budget policy's target: bytes as a share of cloud-only (casserve default: "
             "what recserve at --beta spends on train; budget default: 0.4)",
    )  # fmt: skip
    parser.add_argument("--gap", type=float, default=0.02, help="quality: accuracy share it may lose vs cloud-only")
    parser.add_argument("--fill-cap", type=float, default=0.85, help="budget: most a lower link forwards first")
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="serve queries in a seeded order")
    parser.add_argument("--live", action="store_true", help="through real tier processes over gRPC on loopback")
    parser.add_argument("--json", default=None, metavar="FILE|-", help="write the figures as JSON")
    parser.add_argument("--sweep", action="store_true", help="the accuracy-versus-bytes frontier instead")
    parser.add_argument("--plot", type=Path, default=None, help="with --sweep: write the frontier as a PNG")
    parser.add_argument("--betas", default=",".join(map(str, DEFAULT_BETAS)), help="with --sweep: the β values")


def run(args: argparse.Namespace) -> int:
    chain = tuple(m.strip() for m in args.chain.split(",") if m.strip())
    try:
        if args.sweep:
            return _sweep(args, chain)
        thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
        request = EvalRequest(
            traces=args.traces, chain=chain, split=args.split, policy=args.policy, beta=args.beta,
            window=args.window, thresholds=thresholds, budget=args.budget, shuffle=args.shuffle, live=args.live,
            gap=args.gap, fill_cap=args.fill_cap,
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


def _sweep(args: argparse.Namespace, chain: tuple[str, ...]) -> int:
    betas = tuple(float(b) for b in args.betas.split(","))
    request = SweepRequest(args.traces, chain, args.split, args.window, betas, shuffle=args.shuffle)
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
