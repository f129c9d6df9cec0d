"""The accuracy-versus-bytes frontier of a chain: RecServe's β sweep, CasServe's thresholds, cloud-only, oracle.

RecServe points come from running the live tiers' policy code over the stream, one run per β. CasServe
points come from the depth table (the real messages of every answering depth, and the fixed-threshold
rule applied to the recorded confidences): the Pareto front of a threshold grid evaluated on the split
itself (the best any fixed thresholds could do, in hindsight), and thresholds tuned on the train split
for a byte budget, then applied to the evaluated split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recserve.client.tally import summaries
from recserve.evaluation.frontier import (
    BenchmarkFrontier,
    BetaPoint,
    BudgetPoint,
    ChainFrontier,
    Point,
    PolicyPoint,
    ThresholdPoint,
    pareto,
)
from recserve.evaluation.plans import DEFAULT_BETAS, chain_plan
from recserve.evaluation.replay import (
    DepthTable,
    TraceReplay,
    cloud_only_by_benchmark,
    fixed_threshold_grid,
    tune_fixed_thresholds,
)
from recserve.evaluation.targets import with_targets
from recserve.policies import RecServeConfig


@dataclass(frozen=True)
class SweepRequest:
    traces: Path
    chain: tuple[str, ...]
    split: str = "test"
    window: int = 10_000
    betas: tuple[float, ...] = DEFAULT_BETAS
    grid_points: int = 21
    shuffle: int | None = None
    targets: bool = False  # also the budget and quality policies' frontiers and budget tracking


def _table_point(table: DepthTable, mask: npt.NDArray[np.bool_], depths: npt.NDArray[np.int64]) -> PolicyPoint:
    rows = np.flatnonzero(mask)
    cloud_only = max(int(table.cloud_only_bytes[rows].sum()), 1)
    spent = int(table.link_bytes[rows, depths[rows]].sum())
    return PolicyPoint(float(table.correct[rows, depths[rows]].mean()), spent / cloud_only)


def _hindsight(table: DepthTable, mask: npt.NDArray[np.bool_], grid_points: int) -> tuple[ThresholdPoint, ...]:
    grid = fixed_threshold_grid(table, mask, grid_points)
    return tuple(pareto([ThresholdPoint(accuracy, spent, thresholds) for thresholds, accuracy, spent in grid]))


async def sweep(request: SweepRequest) -> ChainFrontier:
    replay = TraceReplay.load(request.traces, request.chain)
    queries = replay.queries(request.split, request.shuffle)
    table = await replay.depth_table(queries)
    cloud_only = cloud_only_by_benchmark(table)
    tiers = len(request.chain)
    groups = [*sorted(cloud_only), "overall"]
    masks = {g: (table.benchmarks == g) if g != "overall" else np.ones(len(queries), dtype=bool) for g in groups}

    recserve: dict[str, list[BetaPoint]] = {g: [] for g in groups}
    for beta in request.betas:
        outcomes = await replay.run_offline(
            queries, chain_plan(RecServeConfig(beta=beta, window=request.window), tiers).offline
        )
        for group, summary in summaries(outcomes, tiers, cloud_only).items():
            recserve[group].append(BetaPoint(beta, summary.accuracy, summary.bytes_vs_cloud_only))

    casserve_train: dict[str, list[BudgetPoint]] = {g: [] for g in groups}
    train = replay.queries("train")
    if train:
        train_table = await replay.depth_table(train)
        for budget in sorted({p.bytes_vs_cloud_only for p in recserve["overall"]}):
            tuned = tune_fixed_thresholds(train_table, budget, request.grid_points)
            depths = np.zeros(len(queries), dtype=np.int64)
            for benchmark, thresholds in tuned.items():
                mask = table.benchmarks == benchmark
                depths[mask] = table.fixed_threshold_depths(np.array(thresholds))[mask]
            for group in groups:
                if masks[group].any():
                    point = _table_point(table, masks[group], depths)
                    casserve_train[group].append(BudgetPoint(budget, point.accuracy, point.bytes_vs_cloud_only))

    benchmarks = {
        group: BenchmarkFrontier(
            recserve=tuple(recserve[group]),
            casserve_hindsight=_hindsight(table, masks[group], request.grid_points),
            casserve_train=tuple(casserve_train[group]),
            cloud_only=_table_point(table, masks[group], np.full(len(queries), tiers - 1)),
            device_only=_table_point(table, masks[group], np.zeros(len(queries), dtype=np.int64)),
            oracle=_table_point(table, masks[group], table.oracle_depths()),
        )
        for group in groups
    }
    frontier = ChainFrontier(request.chain, request.split, request.window, benchmarks)
    if request.targets:
        frontier = await with_targets(frontier, replay, queries, table, cloud_only)
    return frontier


def plot(frontier: ChainFrontier, path: Path) -> None:
    """One panel per benchmark (and overall): accuracy against bytes as a share of cloud-only."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    groups = list(frontier.benchmarks)
    columns = min(3, len(groups))
    rows = (len(groups) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis, group in zip(axes.flat, groups, strict=False):
        entry = frontier.benchmarks[group]
        _line(axis, entry.recserve, "RecServe (β sweep)", "C0", "o-")
        _line(axis, entry.casserve_hindsight, "CasServe, best fixed thresholds in hindsight", "C1", "--")
        _line(axis, entry.casserve_train, "CasServe tuned on train", "C2", "s:")
        _line(axis, entry.budget, "budget policy (byte-budget sweep)", "C3", "d-")
        _line(axis, entry.budget_tuned, "budget policy, fill cap tuned on train", "C5", "d--")
        _line(axis, entry.quality, "quality policy (gap sweep)", "C4", "v-.")
        for point, label, marker in ((entry.cloud_only, "cloud-only", "k*"), (entry.oracle, "oracle", "r^"),
                                     (entry.device_only, "device-only", "kx")):  # fmt: skip
            axis.plot(point.bytes_vs_cloud_only, point.accuracy, marker, markersize=10, label=label)
        axis.set_title(group)
        axis.set_xlabel("bytes, share of cloud-only")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(groups) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(" → ".join(frontier.chain) + f" ({frontier.split} split)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _line(axis: Any, points: Sequence[Point], label: str, color: str, style: str) -> None:
    if points:
        ordered = sorted(points, key=lambda p: p.bytes_vs_cloud_only)
        xs = [p.bytes_vs_cloud_only for p in ordered]
        axis.plot(xs, [p.accuracy for p in ordered], style, color=color, label=label, markersize=3)
