"""The accuracy-versus-bytes frontier of a chain: RecServe's β sweep, CasServe's thresholds, cloud-only, oracle.

RecServe points come from running the live tiers' policy code over the stream, one run per β. CasServe
points come from the depth table (the real messages of every answering depth, and the fixed-threshold
rule applied to the recorded confidences): the Pareto front of a threshold grid evaluated on the split
itself (the best any fixed thresholds could do, in hindsight), and thresholds tuned on the train split
for a byte budget, then applied to the evaluated split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recserve.evaluation.frontier import Point, pareto
from recserve.evaluation.plans import chain_plan
from recserve.evaluation.replay import (
    DepthTable,
    TraceReplay,
    cloud_only_by_benchmark,
    fixed_threshold_grid,
    summaries,
    tune_fixed_thresholds,
)
from recserve.evaluation.targets import add_target_points
from recserve.policies import RecServeConfig

DEFAULT_BETAS = tuple(round(b, 2) for b in np.linspace(0.0, 1.0, 21))


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


def _table_point(table: DepthTable, mask: np.ndarray, depths: np.ndarray) -> Point:
    rows = np.flatnonzero(mask)
    cloud_only = max(int(table.cloud_only_bytes[rows].sum()), 1)
    spent = int(table.link_bytes[rows, depths[rows]].sum())
    return {"accuracy": float(table.correct[rows, depths[rows]].mean()), "bytes_vs_cloud_only": spent / cloud_only}


async def sweep(request: SweepRequest) -> dict[str, Any]:
    replay = TraceReplay.load(request.traces, request.chain)
    queries = replay.queries(request.split, request.shuffle)
    table = await replay.depth_table(queries)
    cloud_only = cloud_only_by_benchmark(table)
    tiers = len(request.chain)
    groups = [*sorted(cloud_only), "overall"]
    result: dict[str, Any] = {
        "chain": list(request.chain),
        "split": request.split,
        "window": request.window,
        "benchmarks": {g: {"recserve": [], "casserve_hindsight": [], "casserve_train": []} for g in groups},
    }
    masks = {g: (table.benchmarks == g) if g != "overall" else np.ones(len(queries), dtype=bool) for g in groups}

    for beta in request.betas:
        outcomes = await replay.run_offline(
            queries, chain_plan(RecServeConfig(beta=beta, window=request.window), tiers).offline
        )
        for group, summary in summaries(outcomes, tiers, cloud_only).items():
            result["benchmarks"][group]["recserve"].append(
                {"beta": beta, "accuracy": summary.accuracy, "bytes_vs_cloud_only": summary.bytes_vs_cloud_only}
            )

    for group in groups:
        entry = result["benchmarks"][group]
        mask = masks[group]
        grid = fixed_threshold_grid(table, mask, request.grid_points)
        front = pareto([{"accuracy": a, "bytes_vs_cloud_only": b, "index": i} for i, (_, a, b) in enumerate(grid)])
        entry["casserve_hindsight"] = [
            {
                "accuracy": p["accuracy"],
                "bytes_vs_cloud_only": p["bytes_vs_cloud_only"],
                "thresholds": grid[int(p["index"])][0],
            }
            for p in front
        ]
        entry["cloud_only"] = _table_point(table, mask, np.full(len(queries), tiers - 1))
        entry["device_only"] = _table_point(table, mask, np.zeros(len(queries), dtype=np.int64))
        entry["oracle"] = _table_point(table, mask, table.oracle_depths())

    if request.targets:
        await add_target_points(result, replay, queries, table, cloud_only, window=request.window)

    train = replay.queries("train")
    if train:
        train_table = await replay.depth_table(train)
        budgets = sorted({p["bytes_vs_cloud_only"] for p in result["benchmarks"]["overall"]["recserve"]})
        for budget in budgets:
            tuned = tune_fixed_thresholds(train_table, budget, request.grid_points)
            depths = np.zeros(len(queries), dtype=np.int64)
            for benchmark, thresholds in tuned.items():
                mask = table.benchmarks == benchmark
                depths[mask] = table.fixed_threshold_depths(np.array(thresholds))[mask]
            for group in groups:
                if masks[group].any():
                    point = _table_point(table, masks[group], depths)
                    result["benchmarks"][group]["casserve_train"].append({"budget": budget, **point})
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per benchmark (and overall): accuracy against bytes as a share of cloud-only."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    groups = list(result["benchmarks"])
    columns = min(3, len(groups))
    rows = (len(groups) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis, group in zip(axes.flat, groups, strict=False):
        entry = result["benchmarks"][group]
        _line(axis, entry["recserve"], "RecServe (β sweep)", "C0", "o-")
        _line(axis, entry["casserve_hindsight"], "CasServe, best fixed thresholds in hindsight", "C1", "--")
        _line(axis, entry["casserve_train"], "CasServe tuned on train", "C2", "s:")
        _line(axis, entry.get("budget", []), "budget policy (byte-budget sweep)", "C3", "d-")
        _line(axis, entry.get("budget_tuned", []), "budget policy, fill cap tuned on train", "C5", "d--")
        _line(axis, entry.get("quality", []), "quality policy (gap sweep)", "C4", "v-.")
        for key, label, marker in (("cloud_only", "cloud-only", "k*"), ("oracle", "oracle", "r^"),
                                   ("device_only", "device-only", "kx")):  # fmt: skip
            axis.plot(entry[key]["bytes_vs_cloud_only"], entry[key]["accuracy"], marker, markersize=10, label=label)
        axis.set_title(group)
        axis.set_xlabel("bytes, share of cloud-only")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(groups) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(" → ".join(result["chain"]) + f" ({result['split']} split)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _line(axis: Any, points: list[Point], label: str, color: str, style: str) -> None:
    if points:
        ordered = sorted(points, key=lambda p: p["bytes_vs_cloud_only"])
        xs = [p["bytes_vs_cloud_only"] for p in ordered]
        axis.plot(xs, [p["accuracy"] for p in ordered], style, color=color, label=label, markersize=3)
