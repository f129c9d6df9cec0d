"""Serving overhead of a vLLM edge tier: requests/s and tokens/s over gRPC against the same vLLM engine called directly.

Both sides run in one run, on the same model, with the same requests (greedy GENERATE, the tier's default of two
top log-probs per token): first the engine in this process (`VllmEngine.generate`, vLLM batching concurrent
calls), then a `recserve serve` edge tier process with the same engine settings, driven over gRPC from this
process. The ratio tier / direct at each concurrency is the tier's overhead; at 32 concurrent requests the
target is >= 0.90. On a small CPU host the gRPC client shares the cores with the tier, which counts against it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from recserve.core.engine import GenerationRequest
from recserve.engines.vllm import VllmEngine
from recserve.server.processes import TierProcesses
from recserve.tools.models import make_tiny_models
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

TARGET = 0.90


@dataclass
class Run:
    seconds: float
    requests: int
    tokens: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i + 1}? Answer briefly." for i in range(n)]


async def _gated(concurrency: int, jobs: list[str], call: Callable[[str], Awaitable[int]]) -> Run:
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(prompt: str) -> None:
        nonlocal tokens
        async with gate:
            # Awaited first: `tokens += await ...` would read tokens before the await and lose concurrent updates.
            produced = await call(prompt)
            tokens += produced

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in jobs))
    return Run(time.perf_counter() - started, len(jobs), tokens)


async def direct(model: str, levels: list[int], requests: int, max_tokens: int, max_model_len: int) -> dict[int, Run]:
    engine = VllmEngine(model, max_model_len=max_model_len)
    await engine.start()

    async def call(prompt: str) -> int:
        return (await engine.generate(GenerationRequest(prompt=prompt, max_tokens=max_tokens))).completion_tokens

    try:
        await _gated(8, prompts(16), call)  # warm-up: the first requests with log-probs are slow once
        return {c: await _gated(c, prompts(requests), call) for c in levels}
    finally:
        await engine.shutdown()


async def _over_grpc(target: str, levels: list[int], requests: int, max_tokens: int) -> dict[int, Run]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TierServiceStub(channel)

        async def call(prompt: str) -> int:
            request = pb.InferRequest(
                prompt=prompt, task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=max_tokens)
            )
            response: pb.InferResponse = await stub.Infer(request, timeout=600)
            return response.usage.completion_tokens

        await _gated(8, prompts(16), call)
        return {c: await _gated(c, prompts(requests), call) for c in levels}


def tier(model: str, levels: list[int], requests: int, max_tokens: int, max_model_len: int) -> dict[int, Run]:
    with tempfile.TemporaryDirectory(prefix="recserve-bench-") as logs:
        args = ["--tier", "edge", "--engine", "vllm", "--model", model, "--context-length", str(max_model_len),
                "--policy", "local"]  # fmt: skip
        stack = TierProcesses([args], Path(logs))
        try:
            stack.start(timeout=600.0)
            return asyncio.run(_over_grpc(f"127.0.0.1:{stack.ports[0]}", levels, requests, max_tokens))
        finally:
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="tiny models are made here if absent")
    parser.add_argument("--tier-model", default="edge", choices=("device", "edge", "cloud"))
    parser.add_argument("--model", default="", help="a Hugging Face folder or hub id instead of a tiny model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()
    model = args.model or str(make_tiny_models(args.models_dir)[args.tier_model].hf_dir)

    print(f"vLLM direct vs edge tier over gRPC: {model}, {args.requests} requests x {args.max_tokens} tokens per level")
    measured_direct = asyncio.run(direct(model, args.concurrency, args.requests, args.max_tokens, args.max_model_len))
    measured_tier = tier(model, args.concurrency, args.requests, args.max_tokens, args.max_model_len)
    print(f"{'concurrency':>11}  {'direct req/s':>12}  {'tier req/s':>10}  {'direct tok/s':>12}  {'tier tok/s':>10}  "
          f"{'tier/direct':>11}")  # fmt: skip
    for c in args.concurrency:
        d, t = measured_direct[c], measured_tier[c]
        print(f"{c:>11}  {d.rps:>12.2f}  {t.rps:>10.2f}  {d.tps:>12.1f}  {t.tps:>10.1f}  {t.tps / d.tps:>11.3f}")
    if 32 in args.concurrency:
        ratio = measured_tier[32].tps / measured_direct[32].tps
        verdict = "meets" if ratio >= TARGET else "misses"
        print(f"at 32 concurrent requests the tier reaches {ratio:.1%} of the direct engine's throughput "
              f"({verdict} the {TARGET:.0%} target)")  # fmt: skip


if __name__ == "__main__":
    main()
