"""Serving speed on loopback with replay engines: a bare grpc.aio echo hop against one tier and three tiers.

The model costs nothing here (replay), so what is measured is the serving path: gRPC, protobuf,
validation, scoring, the policy and forwarding. All setups run in one invocation, side by side, with the
same request and the same client; the figures to read are the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from recserve.client.trace_client import TraceClient, tier_names
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceSet
from recserve.server.processes import TierProcesses, free_port

METHOD = "/recserve.v1.TierService/Infer"


async def serve_echo(port: int) -> None:
    """A bare unary server that returns the request bytes: the floor any gRPC hop pays."""

    async def echo(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return data

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "recserve.v1.TierService", {"Infer": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("echo ready", flush=True)
    await server.wait_for_termination()


async def load(target: str, payload: bytes, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """Closed loop: `concurrency` callers, each sending the next request when the last one returns."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(20):  # warm-up: connections, first-call costs
            await call(payload)
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                await call(payload, timeout=30)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per setup and concurrency")
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--serve-echo", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo is not None:
        asyncio.run(serve_echo(args.serve_echo))
        return

    traces = TraceSet.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    query = next(q for q in traces.queries if q.benchmark == "mmlu")
    # No id: the same payload is sent over and over, and a tier refuses an id it has already served.
    payload = TraceClient(traces, BUNDLED_CHAIN).request(query).SerializeToString()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, tuple[float, float, float]]] = {}

    with tempfile.TemporaryDirectory(prefix="recserve-bench-") as logs:
        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, __file__, "--serve-echo", str(echo_port)], stdout=subprocess.PIPE)
        assert echo.stdout is not None
        echo.stdout.readline()
        setups = {"echo": (f"127.0.0.1:{echo_port}", None)}
        for folder in ("one", "three"):
            (Path(logs) / folder).mkdir()
        names = tier_names(len(BUNDLED_CHAIN))
        one = TierProcesses([_tier_args(names[0], BUNDLED_CHAIN[0], "local")], Path(logs) / "one")
        three = TierProcesses(
            [_tier_args(t, m, "forward-all") for t, m in zip(names, BUNDLED_CHAIN, strict=True)],
            Path(logs) / "three",
        )
        try:
            for name, stack in (("one tier", one), ("three tiers", three)):
                stack.start()
                setups[name] = (f"127.0.0.1:{stack.ports[0]}", stack)
            for name, (target, _) in setups.items():
                results[name] = {}
                for concurrency in levels:
                    rps, latencies = asyncio.run(load(target, payload, concurrency, args.seconds))
                    results[name][concurrency] = (rps, percentile(latencies, 50), percentile(latencies, 99))
        finally:
            echo.terminate()
            echo.wait()
            one.stop()
            three.stop()

    print(f"serving path on loopback, replay engines, one mmlu request ({len(payload)} bytes), {args.seconds}s each")
    print(f"{'setup':>12} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, by_level in results.items():
        for concurrency, (rps, p50, p99) in by_level.items():
            print(f"{name:>12} {concurrency:>5} {rps:9.0f} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f}")
    print("\nper-hop overhead as a ratio to the bare echo hop (target <= 2x):")
    for concurrency in levels:
        echo_p50 = results["echo"][concurrency][1]
        one_p50 = results["one tier"][concurrency][1]
        three_p50 = results["three tiers"][concurrency][1]
        client_hop = one_p50 / echo_p50
        forward_hop = (three_p50 - one_p50) / 2 / echo_p50
        echo_rps = results["echo"][concurrency][0]
        one_share = results["one tier"][concurrency][0] / echo_rps
        three_share = results["three tiers"][concurrency][0] / echo_rps
        print(
            f"  concurrency {concurrency:>3}: client->device hop {client_hop:.2f}x, each forwarding hop "
            f"{forward_hop:.2f}x (p50 latency); throughput one tier {one_share:.2f}x, three tiers {three_share:.2f}x"
            " of echo"
        )


def _tier_args(tier: str, model: str, policy: str) -> list[str]:
    return [
        "--tier",
        tier,
        "--engine",
        "replay",
        "--traces",
        str(BUNDLED_TRACE),
        "--trace-model",
        model,
        "--policy",
        policy,
    ]


if __name__ == "__main__":
    main()
