"""Replay a trace set through the tier code, offline (in process) or live (tier processes over gRPC).

Offline and live runs push the same InferRequests through the same Tier objects and policies, so they
take the same decisions and count the same bytes: those of the protobuf messages each link carries
(request up, response down). Accuracy is the trace's own verdict for the model that answered.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from recserve.client.trace_client import build_request, link_bytes
from recserve.core.cascade import link_tiers
from recserve.core.engine import Engine
from recserve.core.offload import OffloadPolicy
from recserve.core.traces import TraceQuery, TraceSet
from recserve.engines.replay import ReplayEngine
from recserve.policies.simple import ForwardAllPolicy, LocalOnlyPolicy
from recserve.server.processes import TierProcesses, replay_tiers
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Outcome:
    """How one query was served: which tier answered, whether rightly, and the bytes on each link."""

    benchmark: str
    depth: int  # index in the chain of the tier that answered
    correct: bool
    link_bytes: tuple[int, ...]  # one entry per link, lowest first


@dataclass(frozen=True)
class Summary:
    """The figures `recserve eval` reports for one benchmark or overall."""

    n: int
    accuracy: float
    share_by_tier: list[float]
    bytes_by_link: list[int]
    bytes_total: int
    bytes_vs_cloud_only: float

    def as_json(self) -> dict[str, object]:
        fields = asdict(self)
        del fields["bytes_by_link"]  # the JSON carries exactly the documented fields
        return fields


def summarise(outcomes: Sequence[Outcome], tiers: int, cloud_only_bytes: int) -> Summary:
    n = len(outcomes)
    by_link = [sum(o.link_bytes[i] for o in outcomes) for i in range(tiers - 1)]
    total = sum(by_link)
    return Summary(
        n=n,
        accuracy=sum(o.correct for o in outcomes) / n if n else 0.0,
        share_by_tier=[sum(o.depth == d for o in outcomes) / n if n else 0.0 for d in range(tiers)],
        bytes_by_link=by_link,
        bytes_total=total,
        bytes_vs_cloud_only=total / cloud_only_bytes if cloud_only_bytes else 0.0,
    )


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
        self.names = tier_names(len(chain))

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

    def request(self, index: int, query: TraceQuery) -> pb.InferRequest:
        choice = self.trace_set.answers[query.key][self.chain[0]].is_choice
        # Fixed-width ids: a run's message sizes do not depend on how many queries came before.
        return build_request(query, choice=choice, request_id=f"eval-{index:07d}", reference=False)

    def outcome(self, query: TraceQuery, response: pb.InferResponse) -> Outcome:
        depth = self.names.index(response.answered_by)
        crossed = [size for size, _ in link_bytes(response)]
        sizes = crossed + [0] * (len(self.chain) - 1 - len(crossed))  # links above the answering tier: none
        correct = self.trace_set.answers[query.key][self.chain[depth]].correct
        return Outcome(query.benchmark, depth, correct, tuple(sizes))

    def engines(self) -> list[Engine]:
        return [ReplayEngine(self.traces_dir, model) for model in self.chain]

    def feedback(self, query: TraceQuery, response: pb.InferResponse) -> pb.FeedbackRequest:
        """The recorded verdict on the answering model's answer, as the client (the grader) reports it."""
        correct = self.trace_set.answers[query.key][self.chain[self.names.index(response.answered_by)]].correct
        return pb.FeedbackRequest(request_id=response.request_id, correct=correct)

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
            outcomes = []
            for index, query in enumerate(queries):
                response = await tiers[0].infer(self.request(index, query))
                if feedback:
                    await tiers[0].feedback(self.feedback(query, response))
                outcomes.append(self.outcome(query, response))
            return outcomes
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
            return asyncio.run(self._send(f"127.0.0.1:{stack.ports[0]}", queries, feedback))
        finally:
            stack.stop()

    async def _send(self, target: str, queries: Sequence[TraceQuery], feedback: bool = False) -> list[Outcome]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.TierServiceStub(channel)
            outcomes = []
            for index, query in enumerate(queries):
                response = await stub.Infer(self.request(index, query), timeout=60)
                if feedback:
                    await stub.Feedback(self.feedback(query, response), timeout=60)
                outcomes.append(self.outcome(query, response))
            return outcomes

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
                response = await linked[0].infer(self.request(row, query))
                link_bytes[row, depth] = self.outcome(query, response).link_bytes
                if depth == tiers - 1:
                    confidence[row] = [hop.confidence for hop in response.hops]
            for engine in engines:
                await engine.shutdown()
        correct = np.array(
            [[self.trace_set.answers[q.key][m].correct for m in self.chain] for q in queries], dtype=bool
        )
        benchmarks = np.array([q.benchmark for q in queries])
        return DepthTable(benchmarks, confidence, correct, link_bytes)


def tier_names(count: int) -> tuple[str, ...]:
    """device, edge, cloud for three tiers; device, edge1..edgeN, cloud for longer chains."""
    if count == 2:
        return ("device", "cloud")
    if count == 3:
        return ("device", "edge", "cloud")
    return ("device", *(f"edge{i}" for i in range(1, count - 1)), "cloud")


def summaries(outcomes: Sequence[Outcome], tiers: int, cloud_only: dict[str, int]) -> dict[str, Summary]:
    """Per benchmark (sorted) and `overall`."""
    result: dict[str, Summary] = {}
    for benchmark in sorted({o.benchmark for o in outcomes}):
        chosen = [o for o in outcomes if o.benchmark == benchmark]
        result[benchmark] = summarise(chosen, tiers, cloud_only[benchmark])
    result["overall"] = summarise(outcomes, tiers, sum(cloud_only.values()))
    return result


def cloud_only_by_benchmark(table: DepthTable) -> dict[str, int]:
    totals = table.cloud_only_bytes
    return {str(b): int(totals[table.benchmarks == b].sum()) for b in np.unique(table.benchmarks)}


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
    import itertools

    tiers = table.confidence.shape[1]
    sub = DepthTable(table.benchmarks[mask], table.confidence[mask], table.correct[mask], table.link_bytes[mask])
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
