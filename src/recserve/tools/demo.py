"""`recserve demo`: three tier processes on loopback, benchmark questions through the device tier, a summary.

With the replay engine (the default), each tier replays one real model's recorded answers from the
bundled trace; the client plays the grader and reports each recorded verdict back as Feedback. With
llama_cpp, each tier runs a generated tiny model (meaningless answers, real engine) and accuracy comes
from the reference answers the requests carry.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from recserve.client.tally import (
    ACCURACY,
    BENCHMARK,
    COUNT,
    Column,
    Summary,
    accuracy_text,
    bytes_by_benchmark,
    format_table,
    summaries,
    tier_columns,
)
from recserve.client.trace_client import Outcome, TraceClient, tier_names
from recserve.core.cascade import link_tiers
from recserve.core.engine import Engine
from recserve.core.offload import OffloadPolicy
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceQuery, TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.policies.quality import QualityConfig
from recserve.policies.simple import ForwardAllPolicy
from recserve.server.processes import TierProcesses, replay_tiers, wait_http

TIER_NAMES = tier_names(len(BUNDLED_CHAIN))
# The live stack's policy (services/*/tier.env and the serve defaults): RecServe at beta 0.3.
LIVE_POLICY = "RecServe, beta 0.3 (live)"
# The quality policy the demo sets beside it: at most 2 points below cloud-only, learned from the Feedback.
QUALITY = QualityConfig(quality_gap=0.02).for_chain(len(BUNDLED_CHAIN))


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


def demo_client(trace_set: TraceSet, engine: str) -> TraceClient:
    """The replay engines are graded by the trace's recorded verdicts, real engines by the reference answers."""
    return TraceClient(trace_set, BUNDLED_CHAIN, judge_reference=engine != "replay", id_prefix="demo-", id_digits=6)


async def send_all(target: str, client: TraceClient, queries: list[TraceQuery], concurrency: int) -> list[Outcome]:
    """The questions through the live stack; the client, as the grader, reports recorded verdicts back as Feedback."""
    progress = tqdm(total=len(queries), desc="demo", unit="q", file=sys.stderr, disable=None)
    outcomes = await client.run_live(
        target,
        queries,
        feedback=not client.judge_reference,
        concurrency=concurrency,
        on_outcome=lambda _: progress.update(),
    )
    progress.close()
    return outcomes


async def in_process(
    engines: list[Engine], policies: list[OffloadPolicy], client: TraceClient, queries: list[TraceQuery]
) -> list[Outcome]:
    """The same questions through the same tiers and messages, linked in process, under other policies; the client
    grades as in the live run (Feedback for the replay engines)."""
    tiers = link_tiers(TIER_NAMES, engines, policies)
    for engine in engines:
        await engine.start()
    try:
        return await client.run(tiers[0], queries, feedback=not client.judge_reference)
    finally:
        for engine in engines:
            await engine.shutdown()


def cloud_only_policies() -> list[OffloadPolicy]:
    return [ForwardAllPolicy() for _ in TIER_NAMES]


def quality_policies() -> list[OffloadPolicy]:
    return [QUALITY.build() for _ in TIER_NAMES]


def format_summary(figures: dict[str, Summary], cloud: dict[str, Summary]) -> str:
    """The live run per benchmark and overall, beside the cloud-only run of the same questions."""
    columns = [
        BENCHMARK,
        COUNT,
        ACCURACY,
        Column("cloud-only accuracy", lambda name, _: accuracy_text(cloud[name])),
        *tier_columns(TIER_NAMES),
        Column("bytes vs cloud-only", lambda _, s: f"{s.bytes_vs_cloud_only:.3f}"),
    ]
    return format_table(figures, columns)


def format_policies(by_policy: dict[str, Summary]) -> str:
    """One overall line per policy: what each choice costs in accuracy and buys in bytes."""
    columns = [
        Column("policy", lambda name, _: name),
        ACCURACY,
        *tier_columns(TIER_NAMES)[: len(TIER_NAMES)],
        Column("bytes vs cloud-only", lambda _, s: f"{s.bytes_vs_cloud_only:.3f}"),
    ]
    return format_table(by_policy, columns)


def run_demo(engine: str = "replay", *, limit: int | None = None, concurrency: int = 1,
             model_dir: Path | None = None) -> dict[str, Summary]:  # fmt: skip
    """Run the whole demo and print the summary; returns the figures per benchmark and overall."""
    if engine in ("llama_cpp", "vllm"):
        from recserve.tools.models import make_tiny_models

        model_dir = model_dir or Path("models")
        make_tiny_models(model_dir)
        limit = 20 if limit is None else limit
    trace_set = TraceSet.load(BUNDLED_TRACE)
    queries = select_queries(trace_set, limit)
    client = demo_client(trace_set, engine)
    with tempfile.TemporaryDirectory(prefix="recserve-demo-") as logs:
        stack = TierProcesses(tier_arguments(engine, model_dir), Path(logs))
        try:
            print(f"starting device -> edge -> cloud tiers ({engine} engines) ...", flush=True)
            # vLLM engines take 30-60 s each to load on a small CPU host.
            stack.start(timeout=600.0 if engine == "vllm" else 120.0)
            print(f"sending {len(queries)} questions to the device tier at 127.0.0.1:{stack.ports[0]}", flush=True)
            started = time.perf_counter()
            outcomes = asyncio.run(send_all(f"127.0.0.1:{stack.ports[0]}", client, queries, concurrency))
            elapsed = time.perf_counter() - started
            scraped = [stack.scrape_bytes(i) for i in range(len(TIER_NAMES))]
        finally:
            codes = stack.stop()
    reference = asyncio.run(in_process(engines_for(engine, model_dir), cloud_only_policies(), client, queries))
    quality = asyncio.run(in_process(engines_for(engine, model_dir), quality_policies(), client, queries))
    cloud_bytes = bytes_by_benchmark(reference)
    figures = summaries(outcomes, len(TIER_NAMES), cloud_bytes)
    cloud = summaries(reference, len(TIER_NAMES), cloud_bytes)
    print(f"\n{len(queries)} questions in {elapsed:.1f}s; tier exit codes {codes}\n")
    print(format_summary(figures, cloud))
    print(
        f"\nthe policy is the choice between accuracy and bytes (overall; the quality policy and cloud-only run in"
        f" process on the same tiers and questions, the quality policy to lose at most {QUALITY.quality_gap:.2f}):"
    )
    by_policy = {
        LIVE_POLICY: figures["overall"],
        f"quality, gap {QUALITY.quality_gap:.2f}": summaries(quality, len(TIER_NAMES), cloud_bytes)["overall"],
        "cloud-only": cloud["overall"],
    }
    print(format_policies(by_policy))
    print("\nbytes per link from the tiers' Prometheus counters (Infer and Feedback, sent + received, at each end):")
    for lower in range(len(TIER_NAMES) - 1):
        upper = TIER_NAMES[lower + 1]
        at_lower = sum(v for (peer, _), v in scraped[lower].items() if peer == upper)
        at_upper = sum(v for (peer, _), v in scraped[lower + 1].items() if peer == TIER_NAMES[lower])
        print(f"  {TIER_NAMES[lower]}->{upper}: {at_lower:.0f} at {TIER_NAMES[lower]}, {at_upper:.0f} at {upper}")
    return figures


def serve_demo(engine: str = "llama_cpp", *, port: int = 8000, model_dir: Path | None = None) -> int:
    """The demo's three tiers behind the OpenAI-compatible gateway on 127.0.0.1:`port`, until Ctrl-C or SIGTERM.

    With llama_cpp or vllm the tiers run the generated tiny models, which answer any prompt (meaningless text); the
    replay engines answer only the bundled trace's questions."""
    if engine in ("llama_cpp", "vllm"):
        from recserve.tools.models import make_tiny_models

        model_dir = model_dir or Path("models")
        make_tiny_models(model_dir)
    with tempfile.TemporaryDirectory(prefix="recserve-serve-") as logs:
        stack = TierProcesses(tier_arguments(engine, model_dir), Path(logs))
        gateway: subprocess.Popen[bytes] | None = None
        # SIGTERM ends the wait like Ctrl-C, so the tiers and the gateway stop gracefully either way.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            print(f"starting device -> edge -> cloud tiers ({engine} engines) ...", flush=True)
            stack.start(timeout=600.0 if engine == "vllm" else 120.0)
            gateway = subprocess.Popen(
                [sys.executable, "-m", "recserve", "gateway", "--target", f"127.0.0.1:{stack.ports[0]}",
                 "--port", str(port)],
            )  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/health", gateway, timeout=60.0)
            print(f"OpenAI-compatible API on http://127.0.0.1:{port}/v1 (model 'recserve'); Ctrl-C stops", flush=True)
            gateway.wait()
            return 1  # the gateway ended on its own
        except KeyboardInterrupt:
            return 0
        finally:
            if gateway is not None and gateway.poll() is None:
                gateway.terminate()
                gateway.wait(timeout=30)
            stack.stop()
