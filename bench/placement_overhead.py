"""The time the live placement bench's stack adds to its emulated servers' time, per gRPC hop: what the simulator
(`python -m recserve.evaluation.placement_sim --live-setup --hop-overhead S`) lacks unless told.

It runs bench/placement_bench.py's stack (one placement, one rate) and, per answered request, takes the client's
latency less every tier's engine time (the hops' engine_seconds: the emulated queue, prefill and decode), and fits
that remainder against the number of gRPC calls the request took (the client's to the device, then one per forward:
the hops' count) by least squares through the origin: seconds per hop.

    python bench/placement_overhead.py --policy first --rate 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from placement_bench import CHAIN, Stack, run_rate

from recserve.client.trace_client import TraceClient
from recserve.core.traces import BUNDLED_TRACE, TraceSet
from recserve.evaluation.placement_sim import live_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="first")
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    trace_set = TraceSet.load(BUNDLED_TRACE)
    client = TraceClient(trace_set, CHAIN)
    with tempfile.TemporaryDirectory(prefix="recserve-placement-overhead-") as folder:
        stack = Stack(args.policy, args.beta, 1.0, Path(folder))  # servers at their profiles' speed
        try:
            stack.processes.start(timeout=120.0)
            target = f"127.0.0.1:{stack.processes.ports[0]}"
            queries = live_queries(trace_set, CHAIN)
            results, _ = asyncio.run(run_rate(target, client, queries, args.rate, args.seconds, args.seed))
        finally:
            stack.processes.stop()
    rows = [(len(r.hops), latency - sum(h.engine_seconds for h in r.hops)) for _, r, latency, _ in results if r]
    per_hop = sum(hops * rest for hops, rest in rows) / sum(hops * hops for hops, _ in rows)
    print(f"{len(rows)} answered of {len(results)}; seconds per hop (least squares): {per_hop:.4f}")
    for hops in sorted({hops for hops, _ in rows}):
        rests = [rest for count, rest in rows if count == hops]
        print(f"  {hops} hop(s): {len(rests):4} requests, remainder median {statistics.median(rests):.4f} s, "
              f"mean {statistics.mean(rests):.4f} s")  # fmt: skip


if __name__ == "__main__":
    main()
