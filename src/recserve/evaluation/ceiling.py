"""How far could better ranking take a cascade? Hindsight bounds for tiers that rank requests by more than
their own confidence.

Every policy here forwards a tier's least confident requests; fixed thresholds chosen in hindsight on the
evaluated split bound what any of them reaches, whatever moves its thresholds. This module computes the same
bound when a tier ranks by another score, learned on the train split (per benchmark, ridge logistic
regressions):

- **prompt words** (first tier): P(this tier right) - P(a tier above right), from its confidence and the
  hashed words of the prompt, a router small enough for a phone;
- **agreement** (tiers above the first): its confidence, and agreeing with the tier below ranks first;
- **lower confidence** (tiers above the first): the same gain from its own and the lower tier's confidence.

    python -m recserve.evaluation.ceiling --traces TRACE_FOLDER [--chain a,b,c ...]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from recserve.core.calibration import fit_logistic, logit, sigmoid
from recserve.core.judge import normalise
from recserve.core.traces import TraceQuery
from recserve.evaluation.chains import DEFAULT_CHAINS
from recserve.evaluation.frontier import ThresholdPoint, accuracy_at, bytes_to_reach, format_share
from recserve.evaluation.replay import DepthTable, TraceReplay, fixed_threshold_grid

Scores = npt.NDArray[np.float64]
WORD_DIMENSIONS = 2048
RIDGE = 10.0


def hashed_words(text: str, dimensions: int = WORD_DIMENSIONS) -> Scores:
    """log(1 + count) of the prompt's lower-cased words, hashed into `dimensions` buckets (CRC-32: stable
    across processes, unlike Python's hash)."""
    counts = np.zeros(dimensions)
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        counts[zlib.crc32(word.encode()) % dimensions] += 1
    return np.log1p(counts)


def learned_gain(
    train: Scores, own_right: npt.ArrayLike, above_right: npt.ArrayLike, test: Scores, ridge: float = RIDGE
) -> Scores:
    """P(own answer right | x) - P(a tier above right | x) on `test`, both fitted on `train` (rows of features;
    an intercept is added). High means keep, like a confidence."""

    design = np.column_stack([np.ones(len(train)), train])
    applied = np.column_stack([np.ones(len(test)), test])

    def predict(outcomes: npt.ArrayLike) -> Scores:
        return sigmoid(applied @ fit_logistic(design, outcomes, strength=ridge))

    return predict(own_right) - predict(above_right)


@dataclass(frozen=True)
class Bound:
    accuracy: float | None  # best accuracy within the byte budget
    bytes_within_gap: float | None  # fewest bytes (share of cloud-only) within the gap of cloud-only accuracy


def hindsight(table: DepthTable, mask: npt.NDArray[np.bool_], budget: float, gap: float, points: int) -> Bound:
    """The best accuracy at ≤ `budget` bytes, and the fewest bytes within `gap` of cloud-only accuracy, over a grid
    of fixed thresholds on the table's scores, judged on the same rows."""
    grid = [ThresholdPoint(a, b, t) for t, a, b in fixed_threshold_grid(table, mask, points)]
    target = float(table.correct[mask, -1].mean()) - gap
    return Bound(accuracy_at(grid, budget), bytes_to_reach(grid, target))


def agreement(replay: TraceReplay, queries: Sequence[TraceQuery], tier: int) -> Scores:
    """1 where `tier` gives the same answer as the tier below it (after the judge's normalisation), else 0."""
    models = replay.chain[tier - 1], replay.chain[tier]
    answers = [[normalise(replay.trace_set.answers[q.key][m].answer) for m in models] for q in queries]
    return np.array([below == own for below, own in answers], dtype=np.float64)


@dataclass(frozen=True)
class BenchmarkBounds:
    benchmark: str
    cloud_only: float  # cloud-only accuracy
    by_ranking: dict[str, Bound]


def rescored(table: DepthTable, mask: npt.NDArray[np.bool_], tier: int, scores: Scores) -> DepthTable:
    """`table` with `tier`'s confidence replaced by `scores` on the rows of `mask`."""
    confidence = table.confidence.copy()
    confidence[mask, tier] = scores
    return replace(table, confidence=confidence)


async def ceilings(
    traces: Path, chain: Sequence[str], budget: float = 0.4, gap: float = 0.02, points: int = 41
) -> list[BenchmarkBounds]:
    """Per benchmark: cloud-only accuracy and, for each ranking, the hindsight bound (`hindsight`)."""
    if len(chain) != 3:
        raise ValueError(f"the bounds are for a device, an edge and a cloud model; got {len(chain)} models")
    replay = TraceReplay.load(traces, chain)
    train_queries, test_queries = replay.queries("train"), replay.queries("test")
    train, test = await replay.depth_table(train_queries), await replay.depth_table(test_queries)
    tables = {"train": train, "test": test}
    queries = {"train": train_queries, "test": test_queries}
    # What the device sees (its confidence and the prompt's words) and what the edge sees (its confidence and
    # the device's), per split.
    device_view = {
        split: np.column_stack([logit(t.confidence[:, 0]), [hashed_words(q.user_prompt) for q in queries[split]]])
        for split, t in tables.items()
    }
    edge_view = {split: logit(t.confidence[:, [1, 0]]) for split, t in tables.items()}
    rows = []
    for benchmark in sorted(set(test.benchmarks) & set(train.benchmarks)):
        on = {"train": train.benchmarks == benchmark, "test": test.benchmarks == benchmark}

        def gain(tier: int, view: dict[str, Scores], on: dict[str, npt.NDArray[np.bool_]] = on) -> Scores:
            right = train.correct[on["train"]]
            return learned_gain(
                view["train"][on["train"]], right[:, tier], right[:, tier + 1 :].any(axis=1), view["test"][on["test"]]
            )

        on_test = on["test"]
        agrees = agreement(replay, [q for q, m in zip(test_queries, on_test, strict=True) if m], 1)
        variants = {
            "own confidence": test,
            "prompt words (device)": rescored(test, on_test, 0, gain(0, device_view)),
            "agreement (edge)": rescored(test, on_test, 1, test.confidence[on_test, 1] + agrees),
            "lower confidence (edge)": rescored(test, on_test, 1, gain(1, edge_view)),
        }
        bounds = {name: hindsight(table, on_test, budget, gap, points) for name, table in variants.items()}
        rows.append(BenchmarkBounds(str(benchmark), float(test.correct[on_test, -1].mean()), bounds))
    return rows


def markdown(chain: Sequence[str], rows: Sequence[BenchmarkBounds], budget: float, gap: float) -> str:
    names = list(rows[0].by_ranking) if rows else []
    lines = [
        f"### {' → '.join(chain)}",
        "",
        f"| benchmark | cloud-only accuracy | accuracy at ≤ {budget} bytes: {' / '.join(names)} "
        f"| bytes within {gap * 100:g} pts: {' / '.join(names)} |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        bounds = [row.by_ranking[n] for n in names]
        accuracy = " / ".join(format_share(b.accuracy) for b in bounds)
        spent = " / ".join(format_share(b.bytes_within_gap) for b in bounds)
        lines.append(f"| {row.benchmark} | {row.cloud_only:.3f} | {accuracy} | {spent} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--traces", type=Path, required=True, help="a trace folder (docs/traces.md)")
    parser.add_argument("--chain", action="append", help="comma-separated models; repeat for several chains")
    parser.add_argument("--budget", type=float, default=0.4, help="byte budget, share of cloud-only bytes")
    parser.add_argument("--gap", type=float, default=0.02, help="accuracy gap to cloud-only (0.02 = 2 points)")
    args = parser.parse_args(argv)
    chains = [c.split(",") for c in args.chain] if args.chain else DEFAULT_CHAINS
    for chain in chains:
        rows = asyncio.run(ceilings(args.traces, chain, args.budget, args.gap))
        print(markdown(chain, rows, args.budget, args.gap), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
