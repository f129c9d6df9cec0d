"""`recserve demo`: three tier processes on loopback, benchmark questions through the device tier, a summary.

With the replay engine (the default), each tier replays one real model's recorded answers from the
bundled trace; the client plays the grader and reports each recorded verdict back as Feedback. With
llama_cpp, each tier runs a generated tiny model (meaningless answers, real engine) and accuracy comes
from the reference answers the requests carry.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from recserve.client.trace_client import build_request, link_bytes
from recserve.core.cascade import link_tiers
from recserve.core.engine import Engine
from recserve.core.judge import is_correct
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceQuery, TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.policies.simple import ForwardAllPolicy
from recserve.server.processes import TierProcesses, replay_tiers
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

TIER_NAMES = ("device", "edge", "cloud")


@dataclass
class Tally:
    """What the client saw for one benchmark."""

    n: int = 0
    right: int = 0
    judged: int = 0
    answered_by: Counter[str] = field(default_factory=Counter)
    link_bytes: Counter[str] = field(default_factory=Counter)

    def add(self, response: pb.InferResponse, correct: bool | None) -> None:
        self.n += 1
        self.answered_by[response.answered_by] += 1
        for bytes_on_link, link in link_bytes(response):
            self.link_bytes[link] += bytes_on_link
        if correct is not None:
            self.judged += 1
            self.right += correct

    def merge(self, other: Tally) -> None:
        self.n += other.n
        self.right += other.right
        self.judged += other.judged
        self.answered_by.update(other.answered_by)
        self.link_bytes.update(other.link_bytes)

    @property
    def accuracy(self) -> float | None:
        return self.right / self.judged if self.judged else None

    @property
    def total_bytes(self) -> int:
        return sum(self.link_bytes.values())


def tier_arguments(engine: str, model_dir: Path | None) -> list[list[str]]:
    if engine == "replay":
        return replay_tiers(TIER_NAMES, BUNDLED_CHAIN, BUNDLED_TRACE)
    assert model_dir is not None
    llama = [
        ["--tier", tier, "--engine", "llama_cpp", "--model", str(model_dir / tier / "model.gguf"),
         "--context-length", "4096", "--threads", "1"]
        for tier in TIER_NAMES
    ]  # fmt: skip
    if engine == "vllm":
        # llama.cpp on the device, vLLM above it; vLLM keeps to the models' 2048 positions.
        vllm = [["--tier", t, "--engine", "vllm", "--model", str(model_dir / t / "hf"), "--context-length", "2048"]
                for t in TIER_NAMES[1:]]  # fmt: skip
        return [llama[0], *vllm]
    return llama


def engines_for(engine: str, model_dir: Path | None) -> list[Engine]:
    if engine == "replay":
        return [create_engine("replay", EngineConfig(traces=str(BUNDLED_TRACE), trace_model=m)) for m in BUNDLED_CHAIN]
    assert model_dir is not None
    if engine == "vllm":
        device = create_engine(
            "llama_cpp", EngineConfig(model=str(model_dir / "device" / "model.gguf"), context_length=4096)
        )
        vllm = [create_engine("vllm", EngineConfig(model=str(model_dir / t / "hf"))) for t in TIER_NAMES[1:]]
        return [device, *vllm]
    return [
        create_engine("llama_cpp", EngineConfig(model=str(model_dir / t / "model.gguf"), context_length=4096))
        for t in TIER_NAMES
    ]


def select_queries(trace_set: TraceSet, limit: int | None) -> list[TraceQuery]:
    per_benchmark: dict[str, list[TraceQuery]] = defaultdict(list)
    for query in trace_set.queries:
        if limit is None or len(per_benchmark[query.benchmark]) < limit:
            per_benchmark[query.benchmark].append(query)
    return [q for benchmark in sorted(per_benchmark) for q in per_benchmark[benchmark]]


class Grader:
    """Judges the demo's answers: the trace's recorded verdicts (replay) or the reference (llama_cpp)."""

    def __init__(self, trace_set: TraceSet, engine: str) -> None:
        self.trace_set = trace_set
        self.replay = engine == "replay"
        self._model_of = dict(zip(TIER_NAMES, BUNDLED_CHAIN, strict=True))

    def request(self, index: int, query: TraceQuery) -> pb.InferRequest:
        choice = self.trace_set.answers[query.key][BUNDLED_CHAIN[0]].is_choice
        # Ids of one length, so live and in-process runs send messages of the same size.
        return build_request(query, choice=choice, request_id=f"demo-{index:06d}", reference=not self.replay)

    def verdict(self, query: TraceQuery, response: pb.InferResponse) -> bool | None:
        if self.replay:
            return self.trace_set.answers[query.key][self._model_of[response.answered_by]].correct
        if not query.gold:
            return None
        return is_correct(query.gold, answer=response.answer, chosen_option=response.chosen_option or None)


async def _send_all(target: str, queries: list[TraceQuery], grader: Grader, concurrency: int) -> dict[str, Tally]:
    tallies: dict[str, Tally] = defaultdict(Tally)
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TierServiceStub(channel)
        progress = tqdm(total=len(queries), desc="demo", unit="q", file=sys.stderr, disable=None)

        async def one(index: int, query: TraceQuery) -> None:
            request = grader.request(index, query)
            async with gate:
                response = await stub.Infer(request, timeout=120)
                correct = grader.verdict(query, response)
                if grader.replay and correct is not None:
                    # The client is the grader here: it reports the recorded verdict back to the tiers.
                    await stub.Feedback(pb.FeedbackRequest(request_id=request.request_id, correct=correct))
            tallies[query.benchmark].add(response, correct)
            progress.update()

        await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)))
        progress.close()
    return tallies


async def cloud_only(engines: list[Engine], queries: list[TraceQuery], grader: Grader) -> dict[str, Tally]:
    """What sending every request to the cloud gives: the same tiers and messages, linked in process."""
    tiers = link_tiers(TIER_NAMES, engines, [ForwardAllPolicy() for _ in engines])
    for engine in engines:
        await engine.start()
    tallies: dict[str, Tally] = defaultdict(Tally)
    try:
        for index, query in enumerate(queries):
            response = await tiers[0].infer(grader.request(index, query))
            tallies[query.benchmark].add(response, grader.verdict(query, response))
    finally:
        for engine in engines:
            await engine.shutdown()
    return tallies


def format_summary(tallies: dict[str, Tally], cloud_only: dict[str, Tally]) -> str:
    links = [f"{a}->{b}" for a, b in itertools.pairwise(TIER_NAMES)]
    header = ["benchmark", "n", "accuracy", "cloud-only accuracy", *(f"{t} share" for t in TIER_NAMES),
              *(f"{x} bytes" for x in links), "bytes vs cloud-only"]  # fmt: skip
    overall, overall_cloud = Tally(), Tally()
    rows = []
    for name in sorted(tallies):
        overall.merge(tallies[name])
        overall_cloud.merge(cloud_only[name])
        rows.append(_row(name, tallies[name], cloud_only[name], links))
    rows.append(_row("overall", overall, overall_cloud, links))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _row(name: str, tally: Tally, cloud: Tally, links: list[str]) -> list[str]:
    shares = [f"{tally.answered_by[t] / tally.n:.3f}" for t in TIER_NAMES]
    ratio = f"{tally.total_bytes / cloud.total_bytes:.3f}" if cloud.total_bytes else "n/a"
    per_link = [str(tally.link_bytes[x]) for x in links]
    return [name, str(tally.n), _fraction(tally.accuracy), _fraction(cloud.accuracy), *shares, *per_link, ratio]


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_demo(engine: str = "replay", *, limit: int | None = None, concurrency: int = 1,
             model_dir: Path | None = None) -> dict[str, Tally]:  # fmt: skip
    """Run the whole demo and print the summary; returns the per-benchmark tallies."""
    if engine in ("llama_cpp", "vllm"):
        from recserve.tools.models import make_tiny_models

        model_dir = model_dir or Path("models")
        make_tiny_models(model_dir)
        limit = 20 if limit is None else limit
    trace_set = TraceSet.load(BUNDLED_TRACE)
    queries = select_queries(trace_set, limit)
    grader = Grader(trace_set, engine)
    with tempfile.TemporaryDirectory(prefix="recserve-demo-") as logs:
        stack = TierProcesses(tier_arguments(engine, model_dir), Path(logs))
        try:
            print(f"starting device -> edge -> cloud tiers ({engine} engines) ...", flush=True)
            # vLLM engines take 30-60 s each to load on a small CPU host.
            stack.start(timeout=600.0 if engine == "vllm" else 120.0)
            print(f"sending {len(queries)} questions to the device tier at 127.0.0.1:{stack.ports[0]}", flush=True)
            started = time.perf_counter()
            tallies = asyncio.run(_send_all(f"127.0.0.1:{stack.ports[0]}", queries, grader, concurrency))
            elapsed = time.perf_counter() - started
            scraped = [stack.scrape_bytes(i) for i in range(len(TIER_NAMES))]
        finally:
            codes = stack.stop()
    reference = asyncio.run(cloud_only(engines_for(engine, model_dir), queries, grader))
    print(f"\n{len(queries)} questions in {elapsed:.1f}s; tier exit codes {codes}\n")
    print(format_summary(tallies, reference))
    print("\nbytes per link from the tiers' Prometheus counters (Infer and Feedback, sent + received, at each end):")
    for lower in range(len(TIER_NAMES) - 1):
        upper = TIER_NAMES[lower + 1]
        at_lower = sum(v for (peer, _), v in scraped[lower].items() if peer == upper)
        at_upper = sum(v for (peer, _), v in scraped[lower + 1].items() if peer == TIER_NAMES[lower])
        print(f"  {TIER_NAMES[lower]}->{upper}: {at_lower:.0f} at {TIER_NAMES[lower]}, {at_upper:.0f} at {upper}")
    return tallies
