"""How far the budget goal can be met at all: the best fixed thresholds in hindsight, held per benchmark.

The budget policy's goal (docs/chains.md) asks two things at once: spend the target within ±0.02 on every benchmark,
and be at least as accurate as CasServe tuned on train and RecServe at equal or fewer bytes overall. The rivals do
not spend evenly across benchmarks, and a byte spent where forwarding pays buys more than one spent evenly. This
bounds what any policy that ranks requests by the tiers' own confidences can reach under both demands: per
benchmark, every policy that forwards the k least confident requests at each tier (fixed thresholds, ties split
anywhere), chosen on the test split itself, with each benchmark's bytes within ±0.02 of one target, at no more bytes
overall than the rival plus the tie, the target free. A chain where even this bound is behind a rival is one no such
policy can win there, however it is tuned.

The bound picks, on the very queries it scores, the best of thousands of policies that differ by a few queries each,
so it is optimistic. Beside it: what the budget policy's own split reaches when it is chosen on labelled queries of
the scored traffic's own distribution but none of the scored ones (`cross_validated_split`: every benchmark at the
rival's bytes, the fill caps chosen on half of each benchmark's test queries and replayed statically on the other
half, both ways): the most a split chosen on any calibration set of that size could give. And the same with each
benchmark's budget leaned within the band toward where forwarding pays, the mix of benchmarks known (the choosing
half's, which the scored half shares): the band's whole width spent where it pays, with no control error.

    python -m recserve.evaluation.spending_bound --traces TRACE_FOLDER [--chains docs/results/chains.json]
        [--out docs/results/spending_bound.json] [--jobs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recserve.evaluation.chain_study import (
    BUDGETS,
    BYTES_TOLERANCE,
    RIVALS,
    TIE,
    BudgetRow,
    ChainStudy,
    load_studies,
    meets_goal,
    spendable,
    study_chain,
    verdict,
)
from recserve.evaluation.provenance import probe, record
from recserve.evaluation.replay import DepthTable, TraceReplay, cloud_only_by_benchmark
from recserve.evaluation.splits import split_at_budget, tune_family_fill_caps
from recserve.policies.spending import split_budget

# Bytes are counted in units of this share of the chain's cloud-only bytes, each point's rounded down: the bound is
# then looser than the exact one by at most a unit per benchmark.
UNIT = 1e-4
TARGET_STEP = 0.0025  # the targets tried, from 0 up to the rival's bytes plus the tolerance
# Seeds of the random halvings of each benchmark's test queries that the split is cross-validated over: one halving's
# result depends on which queries fall on which side as much as on the rule.
HALVINGS = (1, 2, 3)
# The span over which a benchmark's gain per byte is measured when its budget leans within the band: chosen by 2-fold
# cross-validation on the train split of every chain, over 0.01 to 0.2 (docs/evaluation.md, "Each benchmark's budget
# leaned within its band").
LEAN_SPAN = 0.2


def _running_total(values: npt.NDArray[np.generic]) -> npt.NDArray[np.int64]:
    """0, then the sums of the first 1, 2, ... values."""
    return np.concatenate(([0], np.cumsum(values, dtype=np.int64)))


def threshold_policies(
    confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_], cost: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Bytes and right answers of every policy that forwards the k least confident requests reaching each tier (all
    k, so ties are split every way: a superset of fixed thresholds). `cost[q, d]` is request q's bytes when tier d
    answers it."""
    tiers = confidence.shape[1]

    def reach(rows: npt.NDArray[np.int64], depth: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if depth == tiers - 1 or rows.size == 0:
            return np.array([cost[rows, depth].sum()]), np.array([correct[rows, depth].sum()])
        ordered = rows[np.argsort(confidence[rows, depth], kind="stable")]
        # What this tier answers itself when it forwards the first k: every request after them.
        own_cost, own_right = _running_total(cost[ordered, depth]), _running_total(correct[ordered, depth])
        kept_cost, kept_right = own_cost[-1] - own_cost, own_right[-1] - own_right
        if depth == tiers - 2:  # the tier above answers all it gets: every k at once
            return (
                _running_total(cost[ordered, depth + 1]) + kept_cost,
                _running_total(correct[ordered, depth + 1]) + kept_right,
            )
        above = [reach(ordered[:k], depth + 1) for k in range(rows.size + 1)]
        return (
            np.concatenate([costs + kept_cost[k] for k, (costs, _) in enumerate(above)]),
            np.concatenate([rights + kept_right[k] for k, (_, rights) in enumerate(above)]),
        )

    return reach(np.arange(confidence.shape[0]), 0)


def best_by_unit(costs: npt.NDArray[np.int64], rights: npt.NDArray[np.int64], unit: float, size: int) -> np.ndarray:
    """The most right answers of a policy whose bytes round down to each unit (-1 where none does)."""
    best = np.full(size, -1, dtype=np.int64)
    np.maximum.at(best, np.minimum((costs / unit).astype(np.int64), size - 1), rights)
    return best


@dataclass(frozen=True)
class BoundRow:
    budget: float
    # Per rival: the bound's accuracy at no more than the rival's bytes (plus the tie), each benchmark within the
    # tolerance of one target; and the same with no per-benchmark demand (any split of the bytes across benchmarks).
    held: dict[str, float]
    free: dict[str, float]
    # Per rival: the budget policy's split, every benchmark at the rival's bytes, chosen on half of the test queries and
    # scored on the other half (`cross_validated_split`), and the same with each benchmark's budget leaned within the
    # band toward where forwarding pays; absent from older reports.
    learned: dict[str, float] | None = None
    leaned: dict[str, float] | None = None


@dataclass(frozen=True)
class ChainBound:
    chain: tuple[str, ...]
    budgets: tuple[BoundRow, ...]


def _max_plus(left: tuple[int, np.ndarray], right: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    """The most right answers for each total of units, of two parts given as (first unit, best by unit from there)."""
    (left_start, left_best), (right_start, right_best) = left, right
    combined = np.full(left_best.size + right_best.size - 1, -1, dtype=np.int64)
    valid = left_best >= 0
    for offset in np.flatnonzero(right_best >= 0):
        window = combined[offset : offset + left_best.size]
        window[valid] = np.maximum(window[valid], left_best[valid] + right_best[offset])
    return left_start + right_start, combined


def _bound(
    fronts: dict[str, np.ndarray], cloud: dict[str, int], unit: float, ceiling: int, queries: int, band: float | None
) -> float:
    """The most accurate combination of per-benchmark policies at no more than `ceiling` units overall: each
    benchmark's bytes within `band` of one target (the best target), or anywhere with `band` None."""
    top = ceiling * unit / sum(cloud.values())
    targets: list[float | None] = (
        [None] if band is None else [float(t) for t in np.arange(0.0, top + band + TARGET_STEP, TARGET_STEP)]
    )
    best = -1
    for target in targets:
        total: tuple[int, np.ndarray] = (0, np.zeros(1, dtype=np.int64))
        for name, front in fronts.items():
            low, high = 0, min(ceiling, front.size - 1)
            if target is not None and band is not None:
                # Rounded down, a unit may hold a point just above the lower edge.
                low = max(low, int(np.floor((target - band) * cloud[name] / unit)))
                high = min(high, int(np.floor((target + band) * cloud[name] / unit)))
            part = front[low : high + 1] if high >= low else np.empty(0, dtype=np.int64)
            if target is None:
                # Free of the band, a point that a cheaper one matches adds nothing (and slows the convolution).
                part = np.where(part > np.maximum.accumulate(np.concatenate(([-1], part[:-1]))), part, -1)
            if not (part >= 0).any():
                total = (0, np.empty(0, dtype=np.int64))
                break
            total = _max_plus(total, (low, part))
        start, sums = total
        allowed = sums[: max(0, ceiling - start + 1)]
        if (allowed >= 0).any():
            best = max(best, int(allowed.max()))
    return best / queries if best >= 0 else float("nan")


def halving(benchmarks: npt.NDArray[np.str_], seed: int) -> npt.NDArray[np.bool_]:
    """A random half of each benchmark's queries (the smaller half where a benchmark's count is odd)."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(benchmarks), dtype=bool)
    for name in np.unique(benchmarks):
        rows = np.flatnonzero(benchmarks == name)
        half[rng.permutation(rows)[: rows.size // 2]] = True
    return half


def benchmark_rights(
    table: DepthTable,
    rows: npt.NDArray[np.int64],
    budgets: Mapping[str, float],
    caps: Mapping[str, float],
    ties: npt.NDArray[np.float64],
) -> dict[str, float]:
    """Right answers per benchmark among `rows`, each benchmark spending its budget in `budgets` at its fill cap in
    `caps` (rates replayed statically: exact rates, exact bytes)."""
    links = table.confidence.shape[1] - 1
    rights = {}
    for name in np.unique(table.benchmarks[rows]):
        chosen = rows[table.benchmarks[rows] == name]
        budget = budgets[str(name)]
        rates = split_budget(budget, links, caps.get(str(name), 1.0))
        rights[str(name)] = split_at_budget(table, chosen, rates, budget, ties)[0] * chosen.size
    return rights


def leaned_budgets(table: DepthTable, budget: float, band: float, span: float = LEAN_SPAN) -> dict[str, float]:
    """Each benchmark's budget within `band` of `budget`, leaned toward where forwarding pays on `table`: every
    benchmark starts at budget - band, and the bytes that frees (on `table`'s own cloud-only bytes, so zero-sum on its
    mix) go first to the benchmarks whose right answers gain most per cloud-only byte from budget - span to budget +
    span (each at its split chosen there), up to budget + band."""
    ties = np.random.default_rng(0).random(len(table.benchmarks))
    rows = np.arange(len(table.benchmarks))
    cloud = cloud_only_by_benchmark(table)
    edges = (max(0.0, budget - span), min(1.0, budget + span))
    at_edge = [
        benchmark_rights(table, rows, dict.fromkeys(cloud, edge), dict(tune_family_fill_caps(table, edge)), ties)
        for edge in edges
    ]
    gain = {name: (at_edge[1][name] - at_edge[0][name]) / max(cloud[name], 1) for name in cloud}
    floor, ceiling = max(0.0, budget - band), min(1.0, budget + band)
    free = sum(total * (budget - floor) for total in cloud.values())
    budgets = {}
    for name in sorted(cloud, key=lambda n: -gain[n]):
        extra = min(ceiling - floor, free / max(cloud[name], 1))
        budgets[name] = floor + extra
        free -= extra * cloud[name]
    return budgets


def cross_validated_split(
    table: DepthTable, budget: float, band: float = 0.0, seeds: Sequence[int] = HALVINGS
) -> float:
    """The accuracy of the budget policy's split at `budget`, chosen on one half of each benchmark's queries and
    replayed on the other half, both ways: a split chosen on labelled queries of the scored traffic's own
    distribution, with none of the scored ones. Every benchmark at `budget`, or with `band` its budget leaned within
    it on the choosing half (`leaned_budgets`, with that half's mix: one the scored half shares). Its fill caps are
    chosen there too (`tune_family_fill_caps`). The mean over the halvings of `seeds`."""
    ties = np.random.default_rng(0).random(len(table.benchmarks))
    even = {str(name): budget for name in np.unique(table.benchmarks)}
    accuracies = []
    for seed in seeds:
        half = halving(table.benchmarks, seed)
        rights = 0.0
        for chosen_on, scored in ((half, ~half), (~half, half)):
            choosing = table.subset(chosen_on)
            budgets = leaned_budgets(choosing, budget, band) if band else even
            caps = dict(tune_family_fill_caps(choosing, budget, family_budgets=budgets))
            rights += sum(benchmark_rights(table, np.flatnonzero(scored), budgets, caps, ties).values())
        accuracies.append(rights / len(table.benchmarks))
    return float(np.mean(accuracies))


async def bound_chain(traces: Path, study: ChainStudy) -> ChainBound:
    replay = TraceReplay.load(traces, study.chain)
    table: DepthTable = await replay.depth_table(replay.queries("test"))
    cost = table.link_bytes.sum(axis=2)
    cloud = cloud_only_by_benchmark(table)
    unit = UNIT * sum(cloud.values())
    size = int(1.0 / UNIT) + 2
    fronts = {}
    for name in cloud:
        rows = table.benchmarks == name
        costs, rights = threshold_policies(table.confidence[rows], table.correct[rows], cost[rows])
        fronts[name] = best_by_unit(costs, rights, unit, size)
    queries = len(table.benchmarks)
    bound_rows = []
    for budget_row in study.budgets:
        held, free, learned, leaned = {}, {}, {}, {}
        for rival in RIVALS:
            spent = getattr(budget_row, rival).bytes
            ceiling = int((spent + TIE) / UNIT)
            held[rival] = _bound(fronts, cloud, unit, ceiling, queries, BYTES_TOLERANCE)
            free[rival] = _bound(fronts, cloud, unit, ceiling, queries, None)
            learned[rival] = cross_validated_split(table, spendable(spent))
            leaned[rival] = cross_validated_split(table, spendable(spent), BYTES_TOLERANCE)
        bound_rows.append(BoundRow(budget_row.budget, held, free, learned, leaned))
    return ChainBound(study.chain, tuple(bound_rows))


async def bound_figures(traces: Path, chain: Sequence[str]) -> dict[str, Any]:
    """One chain's bound, its rivals studied afresh, as results/spending_bound.json records it (what the provenance
    probe fingerprints)."""
    return asdict(await bound_chain(traces, await study_chain(traces, chain)))


def _bound_one(traces: Path, study: ChainStudy) -> ChainBound:
    result = asyncio.run(bound_chain(traces, study))
    print(" → ".join(study.chain), file=sys.stderr, flush=True)
    return result


def _level(row: BudgetRow, bound: dict[str, float], rival: str) -> bool:
    """Whether the bound is at least as accurate as `rival` was, within the tie."""
    return verdict(bound[rival], float(getattr(row, rival).accuracy)) != "loss"


def summary_lines(studies: Sequence[ChainStudy], bounds: Sequence[ChainBound]) -> list[str]:
    """Markdown: per budget, the chains where the bound reaches both rivals (within the tie), held per benchmark and
    free; where the budget policy's split cross-validated on the test split does, every benchmark at the rival's bytes
    and leaned within the band; the budget policy's own count at equal bytes; and the chains where the held bound is
    behind each rival."""
    by_chain = {b.chain: b for b in bounds}
    lines = [
        "| budget | bound, every benchmark within ±0.02 of one target | the same, bytes split freely across benchmarks "
        "| the budget policy's split chosen on half of the test queries, scored on the other half, every benchmark "
        "at the rival's bytes | the same, each benchmark's budget leaned within ±0.02 toward where forwarding pays "
        "| the budget policy at equal bytes (docs/chains.md) | chains where the held bound is behind CasServe / "
        "RecServe |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def level(pairs: list[tuple[BudgetRow, dict[str, float] | None]]) -> str:
        """Chains level with both rivals, of those measured."""
        measured = [(row, accuracy) for row, accuracy in pairs if accuracy is not None]
        if not measured:
            return "not measured"
        count = sum(all(_level(row, accuracy, rival) for rival in RIVALS) for row, accuracy in measured)
        return f"{count} of {len(measured)} ({count / len(measured):.0%})"

    for index, budget in enumerate(BUDGETS):
        pairs = [(s.budgets[index], by_chain[s.chain].budgets[index]) for s in studies if s.chain in by_chain]
        policy = sum(meets_goal(r) for r, _ in pairs)
        behind = " / ".join(str(sum(not _level(r, b.held, x) for r, b in pairs)) for x in RIVALS)
        columns = [level([(r, getattr(b, kind)) for r, b in pairs]) for kind in ("held", "free", "learned", "leaned")]
        lines.append(
            f"| {budget} | {' | '.join(columns)} | {policy} of {len(pairs)} ({policy / len(pairs):.0%}) | {behind} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument(
        "--chains", type=Path, default=Path("docs/results/chains.json"), help="the chain study whose rivals to bound"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/spending_bound.json"))
    parser.add_argument("--jobs", type=int, default=2, help="chains bounded at once, one process each")
    parser.add_argument("--limit", type=int, default=None, help="only the first N chains (a quick look)")
    args = parser.parse_args(argv)
    studies = list(load_studies(args.chains, with_quality=False).values())[: args.limit]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        bounds = list(pool.map(_bound_one, [args.traces] * len(studies), studies))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(b) for b in bounds], indent=1) + "\n")
    print("\n".join(summary_lines(studies, bounds)))
    record(args.out.parent, "spending-bound", asyncio.run(probe(bound_figures)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
