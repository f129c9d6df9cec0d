"""Streaming through the cascade: time to first token and tokens per second, gateway → device → edge → cloud, against
vLLM's own OpenAI server on the same model, measured side by side in one run with the official `openai` client.

- direct: `python -m vllm.entrypoints.openai.api_server` on the cloud's tiny model (what vLLM users run);
- streamed: `recserve gateway` in front of three `recserve serve` tiers, llama.cpp on the device and edge, vLLM on
  the cloud with the same model and engine settings. The requests ask for the last tier (`offload: last_tier`), so
  the tiers below relay without generating and the difference to direct is what the gateway and the three gRPC
  hops add;
- buffered: the same with `stream: false`, the way a router that needs the whole answer before it streams (vLLM's
  semantic router) serves: its time to first token is the whole answer's;
- lower tiers generate: streamed, but the tiers below generate first (forward-all), and their engine seconds (from
  the hop records) are taken off each request's time to first token: "beyond the lower tiers' own generation".

Both servers run at once and the paths are measured in turns, round after round, so that a change in the machine's
load over the run falls on every path alike. The same greedy completion requests (fixed prompts, max_tokens) at
concurrency 1 and 32. Goals: each of the three added hops adds at most 5 ms to the time to first token; tokens per
second through the gateway at least 90% of direct. On a small CPU host the client, the gateway and the tiers share
the cores with the engine under test, which counts against the cascade.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from recserve.core.tier import STREAM_INTERVAL_SECONDS
from recserve.server.processes import TierProcesses, free_port, wait_http
from recserve.tools.models import make_tiny_models

HOP_TARGET_SECONDS = 0.005
THROUGHPUT_TARGET = 0.90
ADDED_HOPS = 3  # gateway -> device -> edge -> cloud, against HTTP straight to the engine's server
MODEL_NAME = "recserve"
DIRECT = "vLLM OpenAI server, direct"


@dataclass
class Request:
    ttft: float  # seconds to the first content; the whole request when buffered
    seconds: float
    tokens: int
    lower_engine_seconds: float = 0.0


@dataclass
class Level:
    requests: list[Request]
    wall: float

    def joined(self, other: Level) -> Level:
        return Level(self.requests + other.requests, self.wall + other.wall)

    @property
    def tokens_per_request(self) -> float:
        return sum(r.tokens for r in self.requests) / len(self.requests)

    @property
    def ttft_median(self) -> float:
        return statistics.median(r.ttft - r.lower_engine_seconds for r in self.requests)

    @property
    def ttft_p90(self) -> float:
        values = sorted(r.ttft - r.lower_engine_seconds for r in self.requests)
        return values[min(len(values) - 1, int(0.9 * len(values)))]

    @property
    def tokens_per_second(self) -> float:
        return sum(r.tokens for r in self.requests) / self.wall


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i + 1}? Answer briefly." for i in range(n)]


async def one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, stream: bool, extra: dict[str, Any]) -> Request:
    started = time.perf_counter()
    if not stream:
        completion = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body=extra
        )
        elapsed = time.perf_counter() - started
        tokens = completion.usage.completion_tokens if completion.usage else 0
        return Request(elapsed, elapsed, tokens)
    first: float | None = None
    tokens = 0
    lower = 0.0
    chunks = await client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in chunks:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        recserve = (chunk.model_extra or {}).get("recserve")
        if recserve:
            lower = sum(hop.get("engine_seconds", 0.0) for hop in recserve.get("hops", [])[:-1])
    elapsed = time.perf_counter() - started
    return Request(first if first is not None else elapsed, elapsed, tokens, lower)


async def run_levels(
    send: Callable[[str], Awaitable[Request]], levels: list[int], requests: list[str]
) -> dict[int, Level]:
    """Each level sends every prompt of `requests` through `send`, `concurrency` at a time, after a warm-up of the
    first 8."""
    await asyncio.gather(*(send(prompt) for prompt in requests[:8]))
    results: dict[int, Level] = {}
    for concurrency in levels:
        gate = asyncio.Semaphore(concurrency)

        async def gated(prompt: str, gate: asyncio.Semaphore = gate) -> Request:
            async with gate:
                return await send(prompt)

        started = time.perf_counter()
        done = await asyncio.gather(*(gated(prompt) for prompt in requests))
        results[concurrency] = Level(list(done), time.perf_counter() - started)
    return results


async def measure(
    base_url: str, levels: list[int], requests: list[str], max_tokens: int, stream: bool, extra: dict[str, Any]
) -> dict[int, Level]:
    """`run_levels` through the official `openai` client."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    try:
        return await run_levels(lambda prompt: one(client, prompt, max_tokens, stream, extra), levels, requests)
    finally:
        await client.close()


def pool(measured: dict[str, dict[int, Level]], name: str, levels: dict[int, Level]) -> None:
    """Add one round of a path's levels to what earlier rounds measured."""
    for concurrency, level in levels.items():
        so_far = measured.setdefault(name, {}).get(concurrency)
        measured[name][concurrency] = level if so_far is None else so_far.joined(level)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def vllm_server(model: str, port: int, max_model_len: int, log: Path) -> subprocess.Popen[bytes]:
    """vLLM's own OpenAI server with the engine settings the vllm engine uses on a CPU host (engines/vllm.py)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len),
            "--dtype", "float32", "--enforce-eager", "--disable-log-stats", "--seed", "0",
            "--kv-cache-memory-bytes", str(1 << 30)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def tier_arguments(models: dict[str, Any], max_model_len: int, stream_interval: float) -> list[list[str]]:
    tiers = [
        ["--tier", "device", "--engine", "llama_cpp", "--model", str(models["device"].gguf), "--threads", "1"],
        ["--tier", "edge", "--engine", "llama_cpp", "--model", str(models["edge"].gguf), "--threads", "1"],
        ["--tier", "cloud", "--engine", "vllm", "--model", str(models["cloud"].hf_dir),
         "--context-length", str(max_model_len)],
    ]  # fmt: skip
    common = ["--policy", "forward-all", "--max-tokens", "4096", "--max-in-flight", "1024",
              "--stream-interval", str(stream_interval)]  # fmt: skip
    return [[*tier, *common] for tier in tiers]


def run_all(models: dict[str, Any], args: argparse.Namespace, logs: Path) -> dict[str, dict[int, Level]]:
    """Both servers up at once, measured in turns (direct, streamed, buffered, and again), so that a change in the
    machine's load over the run falls on every path alike."""
    processes: list[subprocess.Popen[bytes]] = []
    stack = TierProcesses(tier_arguments(models, args.max_model_len, args.stream_interval), logs)
    try:
        direct_port = free_port()
        processes.append(vllm_server(str(models["cloud"].hf_dir), direct_port, args.max_model_len, logs / "vllm.log"))
        wait_http(f"http://127.0.0.1:{direct_port}/health", processes[-1], timeout=600)
        stack.start(timeout=600.0)
        gateway_port = free_port()
        gateway_args = ["-m", "recserve", "gateway", "--target", f"127.0.0.1:{stack.ports[0]}", "--port"]
        log = (logs / "gateway.log").open("wb")
        processes.append(subprocess.Popen([sys.executable, *gateway_args, str(gateway_port)], stdout=log, stderr=log))
        wait_http(f"http://127.0.0.1:{gateway_port}/health", processes[-1], timeout=60)
        direct_url, gateway_url = f"http://127.0.0.1:{direct_port}/v1", f"http://127.0.0.1:{gateway_port}/v1"
        last_tier = {"recserve": {"offload": "last_tier"}}
        paths = {
            DIRECT: (direct_url, True, {}),
            "gateway->3 tiers, streamed": (gateway_url, True, last_tier),
            "gateway->3 tiers, buffered": (gateway_url, False, last_tier),
        }
        measured: dict[str, dict[int, Level]] = {}
        for _ in range(args.rounds):
            for name, (url, stream, extra) in paths.items():
                levels = asyncio.run(
                    measure(url, args.concurrency, prompts(args.requests), args.max_tokens, stream, extra)
                )
                pool(measured, name, levels)
        measured["gateway->3 tiers, lower tiers generate"] = asyncio.run(
            measure(gateway_url, [1], prompts(args.requests // 2), args.max_tokens, True, {})
        )
        return measured
    finally:
        for process in processes:
            stop(process)
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="tiny models are made here if absent")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="turns of every path, to spread drifting load")
    parser.add_argument(
        "--stream-interval", type=float, default=STREAM_INTERVAL_SECONDS, help="the tiers' --stream-interval"
    )
    args = parser.parse_args()
    models = make_tiny_models(args.models_dir)
    with tempfile.TemporaryDirectory(prefix="recserve-stream-bench-") as folder:
        measured = run_all(models, args, Path(folder))
    direct = measured[DIRECT]
    print(f"completions, {args.requests} requests x up to {args.max_tokens} tokens per level and round, "
          f"{args.rounds} rounds in turns; tiers' stream interval {args.stream_interval} s; times in ms")  # fmt: skip
    print(f"{'path':>38}  {'conc.':>5}  {'TTFT p50':>8}  {'TTFT p90':>8}  {'tokens/req':>10}  {'tok/s':>7}  "
          f"{'tok/s vs direct':>15}")  # fmt: skip
    for name, levels in measured.items():
        for concurrency, level in levels.items():
            against = direct.get(concurrency)
            ratio = f"{level.tokens_per_second / against.tokens_per_second:.3f}" if against else "-"
            print(f"{name:>38}  {concurrency:>5}  {1e3 * level.ttft_median:>8.1f}  {1e3 * level.ttft_p90:>8.1f}  "
                  f"{level.tokens_per_request:>10.1f}  {level.tokens_per_second:>7.1f}  {ratio:>15}")  # fmt: skip
    streamed = measured["gateway->3 tiers, streamed"]
    for concurrency in args.concurrency:
        per_hop = (streamed[concurrency].ttft_median - direct[concurrency].ttft_median) / ADDED_HOPS
        share = streamed[concurrency].tokens_per_second / direct[concurrency].tokens_per_second
        print(f"concurrency {concurrency}: {1e3 * per_hop:+.1f} ms per hop to the median time to first token "
              f"({'meets' if per_hop <= HOP_TARGET_SECONDS else 'misses'} the {1e3 * HOP_TARGET_SECONDS:.0f} ms goal); "
              f"tokens/s {share:.1%} of direct ({'meets' if share >= THROUGHPUT_TARGET else 'misses'} the "
              f"{THROUGHPUT_TARGET:.0%} goal)")  # fmt: skip


if __name__ == "__main__":
    main()
