"""What a relaying tier adds to a stream: time to first token and tokens per second through the gateway and one tier
against the gateway and three tiers, the last tier the same in both, measured side by side in one run with the
official `openai` client.

- direct: the cloud's engine served straight over HTTP, OpenAI's streamed completions from a minimal FastAPI app
  calling the engine in its own process (the part vLLM's own server plays in the stream bench; `--serve-direct`);
- gRPC: the official `grpcio` client straight to the cloud tier's `InferStream`, no HTTP;
- one hop: `recserve gateway` → cloud;
- three hops: `recserve gateway` → device → edge → cloud. The requests ask for the last tier (`offload: last_tier`),
  so the device and the edge relay without generating.

The cloud replays the bundled trace's recorded answers (llama3.1-70b) at the speed and capacity of an emulated
server (`--emulate edge-gpu`: a batch of up to 64, tokens paced by its decode steps), so that the run needs neither
llama.cpp nor vLLM and every process left is one whose cost is under test. The two middle hops' share of the
difference is the cost of a relaying hop: (TTFT through three hops - TTFT through one) / 2; the gateway's hop is
TTFT through the gateway and the cloud tier less TTFT direct (both HTTP from the same client; the gRPC path shows how
much of a request's time the HTTP client itself takes).

Why beside bench/stream_bench.py: that bench compares with vLLM's own server, but on a host with fewer cores than
processes (client, gateway, three tiers, vLLM's two), at 32 streams each hop's time is mostly its wait for a core:
a burst of 32 requests queues behind every process's per-request work. This bench runs anywhere Python does, so it
can run on a host with a core per process, where what is left is what a hop costs. Goals (issue 16): a hop adds at
most 5 ms to the time to first token; tokens/s through the gateway at least 90% of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from stream_bench import HOP_TARGET_SECONDS, THROUGHPUT_TARGET, Level, Request, measure, pool, run_levels, stop

from recserve.core.engine import Engine, GenerationRequest, TextDelta
from recserve.core.tier import STREAM_INTERVAL_SECONDS
from recserve.core.traces import BUNDLED_TRACE, TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.server.processes import TierProcesses, free_port, wait_http
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

CLOUD_MODEL = "llama3.1-70b"
DIRECT, GRPC = "direct (engine's own HTTP)", "grpc->cloud"
ONE_HOP, THREE_HOPS = "gateway->cloud", "gateway->device->edge->cloud"


def direct_app(engine: Engine) -> FastAPI:
    """The engine served straight over HTTP: OpenAI's streamed text completions and nothing else (no validation, no
    metrics), as light as such a server gets, so that the gateway's hop is not flattered."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> StreamingResponse:
        body = await http.json()
        request = GenerationRequest(prompt=body["prompt"], max_tokens=body.get("max_tokens") or 16)
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            payload = {"id": "direct", "object": "text_completion", "created": created, "model": body["model"]}
            return f"data: {json.dumps(payload | {'choices': choices} | extra)}\n\n"

        async def events() -> AsyncIterator[str]:
            async for item in engine.stream(request):
                if isinstance(item, TextDelta):
                    yield chunk([{"index": 0, "text": item.text, "finish_reason": None, "logprobs": None}])
                else:
                    usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens}
                    yield chunk([], usage=usage | {"total_tokens": item.prompt_tokens + item.completion_tokens})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def cloud_engine(profile: str) -> Engine:
    config = EngineConfig(traces=str(BUNDLED_TRACE), trace_model=CLOUD_MODEL, emulate=profile)
    return create_engine("replay", config)


def long_answer_prompts(count: int, min_tokens: int = 100) -> list[str]:
    """Distinct prompts of the bundled trace whose recorded cloud answer has at least `min_tokens` tokens (gsm8k's
    worked solutions: about 200 tokens); the replay engine answers only recorded prompts."""
    trace_set = TraceSet.load(BUNDLED_TRACE, [CLOUD_MODEL])
    prompts: list[str] = []
    for query in trace_set.queries:
        recorded = trace_set.answers[query.key][CLOUD_MODEL]
        if recorded.tokens_out >= min_tokens and query.user_prompt not in prompts:
            prompts.append(query.user_prompt)
        if len(prompts) == count:
            return prompts
    raise ValueError(f"the bundled trace has only {len(prompts)} prompts with answers of {min_tokens}+ tokens")


async def measure_grpc(target: str, levels: list[int], prompts: list[str], max_tokens: int) -> dict[int, Level]:
    """`measure` of stream_bench, over gRPC's InferStream instead of HTTP."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TierServiceStub(channel)

        async def one(prompt: str) -> Request:
            request = pb.InferRequest(
                prompt=prompt, task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=max_tokens)
            )
            started, first, tokens = time.perf_counter(), None, 0
            async for event in stub.InferStream(request, timeout=600):
                if first is None and event.HasField("delta") and event.delta.text:
                    first = time.perf_counter() - started
                if event.HasField("final"):
                    tokens = event.final.usage.completion_tokens
            elapsed = time.perf_counter() - started
            return Request(first if first is not None else elapsed, elapsed, tokens)

        return await run_levels(one, levels, prompts)


def direct_server(profile: str, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (logs / "direct.log").open("wb")
    args = [sys.executable, __file__, "--serve-direct", str(port), "--profile", profile]
    process = subprocess.Popen(args, stdout=log, stderr=log)
    wait_http(f"http://127.0.0.1:{port}/health", process, timeout=60)
    return process, f"http://127.0.0.1:{port}/v1"


def tier_arguments(profile: str, stream_interval: float) -> list[list[str]]:
    common = ["--engine", "replay", "--traces", str(BUNDLED_TRACE), "--trace-model", CLOUD_MODEL, "--policy",
              "forward-all", "--max-in-flight", "1024", "--stream-interval", str(stream_interval)]  # fmt: skip
    return [
        ["--tier", "device", *common],
        ["--tier", "edge", *common],
        ["--tier", "cloud", *common, "--emulate", profile],
    ]


def gateway(target_port: int, logs: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (logs / f"{name}.log").open("wb")
    args = [sys.executable, "-m", "recserve", "gateway", "--target", f"127.0.0.1:{target_port}", "--port", str(port)]
    process = subprocess.Popen(args, stdout=log, stderr=log)
    wait_http(f"http://127.0.0.1:{port}/health", process, timeout=60)
    return process, f"http://127.0.0.1:{port}/v1"


def run_all(args: argparse.Namespace, logs: Path) -> dict[str, dict[int, Level]]:
    """Every path up at once, measured in turns, so that a change in the machine's load falls on all alike. A level
    sends `--requests` requests, or two per stream if that is more (32 streams: two bursts of 32)."""
    prompts = long_answer_prompts(max(args.requests, 2 * max(args.concurrency)))
    stack = TierProcesses(tier_arguments(args.profile, args.stream_interval), logs)
    gateways: list[subprocess.Popen[bytes]] = []
    try:
        stack.start(timeout=120.0)
        process, url = direct_server(args.profile, logs)
        gateways.append(process)
        paths: dict[str, str] = {DIRECT: url}
        for name, port in ((ONE_HOP, stack.ports[2]), (THREE_HOPS, stack.ports[0])):
            process, url = gateway(port, logs, name.replace("->", "-"))
            gateways.append(process)
            paths[name] = url
        last_tier = {"recserve": {"offload": "last_tier"}}
        measured: dict[str, dict[int, Level]] = {}
        cloud = f"127.0.0.1:{stack.ports[2]}"
        for _, concurrency, name in itertools.product(range(args.rounds), args.concurrency, (GRPC, *paths)):
            sent = prompts[: max(args.requests, 2 * concurrency)]
            if name == GRPC:
                levels = asyncio.run(measure_grpc(cloud, [concurrency], sent, args.max_tokens))
            else:
                levels = asyncio.run(measure(paths[name], [concurrency], sent, args.max_tokens, True, last_tier))
            pool(measured, name, levels)
        return measured
    finally:
        for process in gateways:
            stop(process)
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=16, help="requests per level and round (at least 2 a stream)")
    parser.add_argument("--max-tokens", type=int, default=512, help="above the recorded answers' lengths")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each path, to spread drifting load")
    parser.add_argument("--profile", default="edge-gpu", help="the emulated server the cloud replays at")
    parser.add_argument(
        "--stream-interval", type=float, default=STREAM_INTERVAL_SECONDS, help="the tiers' --stream-interval"
    )
    parser.add_argument("--serve-direct", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the direct server
    args = parser.parse_args()
    if args.serve_direct:
        uvicorn.run(
            direct_app(cloud_engine(args.profile)), host="127.0.0.1", port=args.serve_direct, log_level="warning"
        )
        return
    with tempfile.TemporaryDirectory(prefix="recserve-relay-bench-") as folder:
        measured = run_all(args, Path(folder))
    print(f"completions streamed, {args.requests} requests x up to {args.max_tokens} tokens per level and round, "
          f"{args.rounds} rounds in turns; cloud: replay at {args.profile}; tiers' stream interval "
          f"{args.stream_interval} s; {os.cpu_count()} CPUs; times in ms")  # fmt: skip
    print(f"{'path':>30}  {'conc.':>5}  {'TTFT p50':>8}  {'TTFT p90':>8}  {'tokens/req':>10}  {'tok/s':>7}")
    for name, levels in measured.items():
        for concurrency, level in levels.items():
            print(f"{name:>30}  {concurrency:>5}  {1e3 * level.ttft_median:>8.1f}  {1e3 * level.ttft_p90:>8.1f}  "
                  f"{level.tokens_per_request:>10.1f}  {level.tokens_per_second:>7.1f}")  # fmt: skip
    direct, one, three = measured[DIRECT], measured[ONE_HOP], measured[THREE_HOPS]
    for concurrency in args.concurrency:
        gateway_hop = one[concurrency].ttft_median - direct[concurrency].ttft_median
        per_hop = (three[concurrency].ttft_median - one[concurrency].ttft_median) / 2
        ratio = three[concurrency].tokens_per_second / direct[concurrency].tokens_per_second
        print(f"concurrency {concurrency}: the gateway with the cloud tier adds {1e3 * gateway_hop:+.1f} ms and each "
              f"relaying tier {1e3 * per_hop:+.1f} ms to the median time to first token "
              f"({'meets' if max(gateway_hop, per_hop) <= HOP_TARGET_SECONDS else 'misses'} the "
              f"{1e3 * HOP_TARGET_SECONDS:.0f} ms goal); tokens/s through gateway and three tiers {ratio:.1%} of "
              f"direct ({'meets' if ratio >= THROUGHPUT_TARGET else 'misses'} the {THROUGHPUT_TARGET:.0%} "
              "goal)")  # fmt: skip


if __name__ == "__main__":
    main()
