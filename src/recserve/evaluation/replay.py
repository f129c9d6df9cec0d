"""Replay a trace set through the tier code, offline (in process) or live (tier processes over gRPC).

Offline and live runs push the same InferRequests through the same Tier objects and policies, so they
take the same decisions and count the same bytes: those of the protobuf messages each link carries
(request up, response down). Accuracy is the trace's own verdict for the model that answered.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from recserve.client.trace_client import Outcome, TraceClient
from recserve.core.cascade import link_tiers
from recserve.core.engine import Engine
from recserve.core.offload import OffloadPolicy
from recserve.core.traces import TraceQuery, TraceSet
from recserve.engines.replay import ReplayEngine
from recserve.policies.simple import ForwardAllPolicy, LocalOnlyPolicy
from recserve.server.processes import TierProcesses, replay_tiers


@dataclass(frozen=True)
class DepthTable:
    """Per query, what happens if tier d answers it: bytes per link, verdict, and each tier's confidence.

    Fixed-threshold cascades and the oracle only depend on this table, which makes grid searches cheap;
    the table itself comes from running the real tiers with each possible answering depth.
    """

    benchmarks: npt.NDArray[np.str_]  # [query]
    confidence: npt.NDArray[np.float64]  # [query, tier]
    correct: npt.NDArray[np.bool_]  # [query, tier]
    link_bytes: npt.NDArray[np.int64]  # [query, answering depth, link]

    @property
    def cloud_only_bytes(self) -> npt.NDArray[np.int64]:
        result: npt.NDArray[np.int64] = self.link_bytes[:, -1, :].sum(axis=1)
        return result

    def subset(self, rows: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> DepthTable:
        """The table of `rows` only (a mask or indices)."""
        return DepthTable(self.benchmarks[rows], self.confidence[rows], self.correct[rows], self.link_bytes[rows])

    def outcomes(self, depths: npt.NDArray[np.int64]) -> list[Outcome]:
        rows = np.arange(len(depths))
        return [
            Outcome(str(b), int(d), bool(c), tuple(int(x) for x in lb))
            for b, d, c, lb in zip(
                self.benchmarks, depths, self.correct[rows, depths], self.link_bytes[rows, depths], strict=True
            )
        ]

    def oracle_depths(self) -> npt.NDArray[np.int64]:
        """The cheapest tier that answers right; the first tier when none does (no bytes can help)."""
        any_right = self.correct.any(axis=1)
        return np.where(any_right, self.correct.argmax(axis=1), 0).astype(np.int64)

    def fixed_threshold_depths(self, thresholds: Sequence[float] | npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Depth reached when tier d forwards iff its confidence < thresholds[d] (the last tier never does)."""
        tiers = self.confidence.shape[1]
        stays = np.ones_like(self.confidence, dtype=bool)
        stays[:, : tiers - 1] = self.confidence[:, : tiers - 1] >= np.asarray(thresholds)[None, :]
        depths: npt.NDArray[np.int64] = stays.argmax(axis=1).astype(np.int64)
        return depths


class TraceReplay:
    """A chain of models from a trace set, played as device → ... → cloud."""

    def __init__(self, trace_set: TraceSet, traces_dir: Path, chain: Sequence[str]) -> None:
        if len(chain) < 2:
            raise ValueError("a chain needs at least two models, e.g. --chain llama3.2-1b,llama3.1-70b")
        missing = [m for m in chain if m not in trace_set.models]
        if missing:
            raise ValueError(
                f"model(s) {', '.join(missing)} not in {traces_dir}; it has: {', '.join(trace_set.models)}"
            )
        self.trace_set = trace_set
        self.traces_dir = traces_dir
        self.chain = tuple(chain)
        # Graded by the trace's recorded verdicts; the client plays the grader when Feedback is asked for.
        self.client = TraceClient(trace_set, chain, id_prefix="eval-", id_digits=7)
        self.names = self.client.names

    @classmethod
    def load(cls, traces_dir: str | Path, chain: Sequence[str]) -> TraceReplay:
        traces_dir = Path(traces_dir)
        return cls(TraceSet.load(traces_dir, chain), traces_dir, chain)

    def queries(self, split: str, shuffle: int | None = None) -> list[TraceQuery]:
        """Queries of `split` by benchmark, in qid order; a seeded shuffle mixes them when asked."""
        chosen = sorted((q for q in self.trace_set.queries if q.split == split), key=lambda q: (q.benchmark, q.qid))
        if shuffle is not None:
            random.Random(shuffle).shuffle(chosen)
        return chosen

    def engines(self) -> list[Engine]:
        return [ReplayEngine(self.traces_dir, model) for model in self.chain]

    async def run_offline(
        self, queries: Sequence[TraceQuery], policies: Sequence[OffloadPolicy], *, feedback: bool = False
    ) -> list[Outcome]:
        """Serve `queries` in order through in-process tiers; the policies keep their state across queries.

        With `feedback`, each response's recorded verdict goes back through the first tier's Feedback before
        the next query, as the live run sends it (Feedback bytes are not link bytes of the figures).
        """
        engines = self.engines()
        for engine in engines:
            await engine.start()
        tiers = link_tiers(self.names, engines, policies)
        try:
            return await self.client.run(tiers[0], queries, feedback=feedback)
        finally:
            for engine in engines:
                await engine.shutdown()

    def run_live(
        self, queries: Sequence[TraceQuery], policy_args: Sequence[list[str]], log_dir: Path, *, feedback: bool = False
    ) -> list[Outcome]:
        """Serve `queries` in order through `recserve serve` processes on loopback, one request at a time."""
        args = [
            [*tier, *extra]
            for tier, extra in zip(replay_tiers(self.names, self.chain, self.traces_dir), policy_args, strict=True)
        ]
        stack = TierProcesses(args, log_dir)
        try:
            stack.start()
            return asyncio.run(self.client.run_live(f"127.0.0.1:{stack.ports[0]}", queries, feedback=feedback))
        finally:
            stack.stop()

    async def depth_table(self, queries: Sequence[TraceQuery]) -> DepthTable:
        """Run the real tiers once per answering depth (tiers below forward, that one answers)."""
        tiers = len(self.chain)
        link_bytes = np.zeros((len(queries), tiers, tiers - 1), dtype=np.int64)
        confidence = np.zeros((len(queries), tiers))
        for depth in range(tiers):
            policies: list[OffloadPolicy] = [
                ForwardAllPolicy() if d < depth else LocalOnlyPolicy() for d in range(tiers)
            ]
            engines = self.engines()
            for engine in engines:
                await engine.start()
            linked = link_tiers(self.names, engines, policies)
            for row, query in enumerate(queries):
                response, outcome = await self.client.serve(linked[0], query, row)
                link_bytes[row, depth] = outcome.link_bytes
                if depth == tiers - 1:
                    confidence[row] = [hop.confidence for hop in response.hops]
            for engine in engines:
                await engine.shutdown()
        correct = np.array(
            [[self.trace_set.answers[q.key][m].correct for m in self.chain] for q in queries], dtype=bool
        )
        benchmarks = np.array([q.benchmark for q in queries])
        return DepthTable(benchmarks, confidence, correct, link_bytes)


def cloud_only_by_benchmark(table: DepthTable, rows: Sequence[int] | None = None) -> dict[str, int]:
    """Each benchmark's bytes when the last tier answers, over `rows` of the table (all by default)."""
    chosen = np.arange(len(table.benchmarks)) if rows is None else np.asarray(rows, dtype=np.int64)
    totals, names = table.cloud_only_bytes[chosen], table.benchmarks[chosen]
    return {str(b): int(totals[names == b].sum()) for b in np.unique(names)}


def threshold_candidates(confidences: npt.NDArray[np.float64], points: int) -> npt.NDArray[np.float64]:
    """Quantiles of a tier's confidences, plus 0 (never forward) and just above the maximum (always)."""
    if confidences.size == 0:
        return np.array([0.0])
    quantiles = np.quantile(confidences, np.linspace(0.0, 1.0, points))
    top = np.nextafter(confidences.max(), np.inf)
    return np.unique(np.concatenate(([0.0], quantiles, [top])))


def fixed_threshold_grid(
    table: DepthTable, mask: npt.NDArray[np.bool_], points: int
) -> list[tuple[tuple[float, ...], float, float]]:
    """(thresholds, accuracy, bytes share of cloud-only) for every combination of candidate thresholds."""
    tiers = table.confidence.shape[1]
    sub = table.subset(mask)
    candidates = [threshold_candidates(sub.confidence[:, d], points) for d in range(tiers - 1)]
    cloud_only = max(int(sub.cloud_only_bytes.sum()), 1)
    rows = np.arange(len(sub.benchmarks))
    total_by_depth = sub.link_bytes.sum(axis=2)  # [query, depth]
    grid = []
    for combo in itertools.product(*candidates):
        depths = sub.fixed_threshold_depths(np.array(combo))
        accuracy = float(sub.correct[rows, depths].mean()) if len(rows) else 0.0
        grid.append((tuple(float(t) for t in combo), accuracy, float(total_by_depth[rows, depths].sum()) / cloud_only))
    return grid


def tune_fixed_thresholds(table: DepthTable, budget: float, points: int = 41) -> dict[str, tuple[float, ...]]:
    """CasServe tuning: per benchmark, the thresholds of highest accuracy within `budget` (share of
    cloud-only bytes), fewest bytes on ties."""
    tuned: dict[str, tuple[float, ...]] = {}
    for benchmark in np.unique(table.benchmarks):
        grid = fixed_threshold_grid(table, table.benchmarks == benchmark, points)
        within = [g for g in grid if g[2] <= budget + 1e-12]
        best = max(within, key=lambda g: (g[1], -g[2]))
        tuned[str(benchmark)] = best[0]
    return tuned
