"""Write docs/results.md: every benchmark of a trace set, several chains, every policy, frontiers as PNG.

Run with `make results` (or `python -m recserve.evaluation.report --traces DIR --out docs`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recserve.client.tally import Summary
from recserve.evaluation.chain_study import load_studies, summary_lines
from recserve.evaluation.chains import DEFAULT_CHAINS
from recserve.evaluation.frontier import ChainFrontier, Point, accuracy_at, bytes_to_reach, format_share
from recserve.evaluation.plans import EvalRequest, evaluate
from recserve.evaluation.provenance import probe, record
from recserve.evaluation.sweep import SweepRequest, plot, sweep
from recserve.evaluation.targets import plot_tracking, target_lines
from recserve.policies import RecServeConfig

POLICIES = ("device-only", "recserve", "casserve", "cloud-only", "oracle")
DEFAULT_BETA = RecServeConfig().beta  # RecServe's default, from its configuration


async def chain_figures(
    traces: Path, chain: Sequence[str], beta: float = DEFAULT_BETA
) -> tuple[dict[str, dict[str, Summary]], ChainFrontier]:
    """One chain's figures: every policy at `beta` (summaries by policy and benchmark), and the frontiers."""
    results = {
        policy: await evaluate(EvalRequest(traces=traces, chain=tuple(chain), policy=policy, options={"beta": beta}))
        for policy in POLICIES
    }
    return results, await sweep(SweepRequest(traces, tuple(chain), targets=True))


async def chain_figures_json(traces: Path, chain: Sequence[str], beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """`chain_figures` as JSON (what the provenance probe fingerprints)."""
    results, frontier = await chain_figures(traces, chain, beta)
    summaries = {policy: {b: asdict(s) for b, s in by_benchmark.items()} for policy, by_benchmark in results.items()}
    return {"policies": summaries, "frontier": frontier.to_json()}


async def chain_section(traces: Path, chain: Sequence[str], out: Path, beta: float) -> str:
    name = " → ".join(chain)
    slug = "_".join(chain).replace(".", "")
    results, frontier = await chain_figures(traces, chain, beta)
    (out / "results").mkdir(parents=True, exist_ok=True)
    plot(frontier, out / "results" / f"{slug}.png")
    (out / "results" / f"{slug}.json").write_text(json.dumps(frontier.to_json(), indent=1) + "\n")

    lines = [f"## {name}", "", f"![frontier](results/{slug}.png)", ""]
    lines += [
        f"At β = {beta} (RecServe's default), CasServe tuned on the train split for the same byte share that RecServe "
        "spends there:",
        "",
        "| benchmark | n | policy | accuracy | share per tier | bytes | bytes vs cloud-only |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for benchmark in results["recserve"]:
        for policy in POLICIES:
            s = results[policy][benchmark]
            shares = " / ".join(f"{x:.2f}" for x in s.share_by_tier)
            lines.append(
                f"| {benchmark} | {s.n} | {policy} | {s.accuracy:.3f} | {shares} | {s.bytes_total} | "
                f"{s.bytes_vs_cloud_only:.3f} |"
            )
    lines += [
        "",
        "Along the frontiers: bytes (share of cloud-only) needed to get within 2 points of cloud-only accuracy, and "
        "the best accuracy at 40% of cloud-only bytes:",
        "",
        "| benchmark | cloud-only accuracy | bytes within 2 pts: RecServe / CasServe tuned on train / best fixed in "
        "hindsight / oracle | accuracy at 0.4 bytes: RecServe / CasServe tuned on train / best fixed in hindsight |",
        "| --- | --- | --- | --- |",
    ]
    for benchmark, entry in frontier.benchmarks.items():
        target = entry.cloud_only.accuracy - 0.02
        oracle = [entry.oracle] if entry.oracle.accuracy >= target else []
        curves: tuple[Sequence[Point], ...] = (entry.recserve, entry.casserve_train, entry.casserve_hindsight)
        reach = [bytes_to_reach(points, target) for points in curves]
        at_budget = [accuracy_at(points, 0.4) for points in curves]
        lines.append(
            f"| {benchmark} | {entry.cloud_only.accuracy:.3f} | "
            f"{' / '.join(format_share(x) for x in [*reach, bytes_to_reach(oracle, target)])} | "
            f"{' / '.join(format_share(x) for x in at_budget)} |"
        )
    lines += ["", _verdict(frontier)]
    plot_tracking([frontier], out / "results" / f"{slug}_budget_tracking.png")
    lines += [*target_lines(frontier, f"results/{slug}_budget_tracking.png"), ""]
    return "\n".join(lines)


def _verdict(frontier: ChainFrontier) -> str:
    """Say plainly, per benchmark, whether RecServe's β sweep beats the train-tuned fixed cascade at 40% bytes."""
    wins: list[str] = []
    losses: list[str] = []
    for benchmark, entry in frontier.benchmarks.items():
        ours, theirs = accuracy_at(entry.recserve, 0.4), accuracy_at(entry.casserve_train, 0.4)
        if ours is None or theirs is None:
            continue
        (wins if ours > theirs else losses).append(f"{benchmark} ({ours:.3f} vs {theirs:.3f})")
    parts = []
    if losses:
        parts.append(
            "RecServe loses to the train-tuned fixed cascade at 40% of cloud-only bytes on " + ", ".join(losses)
        )
    if wins:
        parts.append("it wins on " + ", ".join(wins))
    return ("; ".join(parts) + ".") if parts else ""


def every_chain_section(out: Path) -> str:
    """The distribution over every chain of the trace set, from the every-chain study's results in `out` (`make
    chains` writes them; empty when it has not run)."""
    path = out / "results" / "chains.json"
    if not path.exists():
        return ""
    studies = list(load_studies(path).values())
    intro = (
        "From `make chains TRACES=TRACE_FOLDER`, run separately (about 1.5 hours on two cores): the budget and quality "
        "policies on every ordered chain of 2 and 3 models of the trace set, against rivals tuned on the train split. "
        "[docs/chains.md](chains.md) has the same summary with how the rivals are tuned, results/chains.json every "
        'chain\'s figures, and docs/evaluation.md ("Every chain") what was tried and where the policies still lose.'
    )
    return "\n".join(["## Every chain", "", intro, "", *summary_lines(studies), ""])


async def write_report(traces: Path, chains: Sequence[Sequence[str]], out: Path, beta: float) -> Path:
    sections = [await chain_section(traces, chain, out, beta) for chain in chains]
    sections.append(every_chain_section(out))
    command = f"python -m recserve.evaluation.report --traces TRACE_FOLDER --out {out}"
    header = f"""# Results: RecServe against CasServe, cloud-only and the oracle on recorded traces

Produced by `make results TRACES=TRACE_FOLDER` (that is, `{command}`), from the recorded outputs of real models in the
trace set (see docs/traces.md; origin: mzelling/rational-llm-cascades, arXiv 2501.09345). Every figure
replays the test split through the tier code: the live tiers' policies, the real protobuf messages, bytes
counted per link (request up, response down). `recserve eval --live` gives the same figures through real
tier processes over gRPC (tests/integration/test_eval_live.py checks this).

Policies: **recserve** (windowed β-quantile per tier and benchmark, W = 10 000), **casserve** (fixed
thresholds per tier and benchmark, tuned by grid search on the train split for a byte budget, then applied
to test), **cloud-only** (every request to the last tier), **device-only**, **oracle** (the cheapest tier
that answers right: a bound no online policy reaches). In the plots, "best fixed thresholds in hindsight"
is the Pareto front of a threshold grid evaluated on the test split itself (per benchmark; the overall panel
uses thresholds shared by all benchmarks), and "CasServe tuned on train" uses, as budgets, the byte shares
of the RecServe points.

Target-driven policies: **budget** holds a byte budget (a share of cloud-only bytes), **quality** an accuracy
gap to the tiers above (learned from Feedback verdicts); they are the objects that
`recserve serve --policy budget|quality` builds, described in [docs/evaluation.md](evaluation.md) (its list of
policies, and "Known limits of the target policies"). Runs of the quality policy send each response's recorded
verdict back as Feedback; Feedback messages are not counted in the link bytes reported here, which are the Infer
requests and responses.

"""
    path = out / "results.md"
    path.write_text(header + "\n".join(sections))
    record(out / "results", "results", await probe(functools.partial(chain_figures_json, beta=beta)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA)
    parser.add_argument("--chain", action="append", default=None, help="comma-separated; repeat for several chains")
    args = parser.parse_args(argv)
    chains = [c.split(",") for c in args.chain] if args.chain else DEFAULT_CHAINS
    print(asyncio.run(write_report(args.traces, chains, args.out, args.beta)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
