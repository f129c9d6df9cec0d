"""Load and chaos runs against a local three-tier stack: nothing lost, memory bounded, recovery after faults.

`python -m recserve.tools.load load --clients 200 --seconds 60` (make load) and
`python -m recserve.tools.load chaos --signal KILL|TERM|STOP` (make chaos): the edge killed, stopped gracefully,
or hung (SIGSTOP, then SIGCONT). Tiers run as `recserve serve` processes on loopback with replay engines over the
bundled trace, so the serving path, not a model, is under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from recserve.client.trace_client import TraceClient
from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceSet
from recserve.server.processes import TierProcesses, replay_tiers
from recserve.tools.demo import TIER_NAMES
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc


@dataclass
class LoadReport:
    """Every request sent, and what came of it."""

    sent: int = 0
    answered: int = 0
    degraded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    answered_by: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    # (seconds since start, answering tier, degraded) per answer, to see recovery over time.
    timeline: list[tuple[float, str, bool]] = field(default_factory=list)
    # (seconds since start, status code) per error.
    error_timeline: list[tuple[float, str]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Requests that got neither an answer nor an explicit error (must be 0 by construction)."""
        return self.sent - self.answered - sum(self.errors.values())

    def summary(self) -> str:
        p50 = statistics.median(self.latencies) if self.latencies else 0.0
        p99 = statistics.quantiles(self.latencies, n=100)[98] if len(self.latencies) > 1 else p50
        rss = ", ".join(f"{t} {b / 2**20:.0f} MiB" for t, b in self.peak_rss_bytes.items())
        return (
            f"{self.sent} sent, {self.answered} answered ({self.degraded} degraded), errors {dict(self.errors)}, "
            f"lost {self.lost}; {self.answered / self.seconds:.0f} answers/s, p50 {p50 * 1e3:.1f} ms, "
            f"p99 {p99 * 1e3:.1f} ms; answered by {dict(self.answered_by)}; peak RSS {rss}"
        )


def demo_requests(limit: int = 400) -> list[pb.InferRequest]:
    """Test questions of the bundled trace; sent over and over, so without ids (the first tier names each call)."""
    traces = TraceSet.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    queries = [q for q in traces.queries if q.split == "test"][:limit]
    client = TraceClient(traces, BUNDLED_CHAIN)
    return [client.request(q) for q in queries]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def run_load(
    target: str,
    requests: Sequence[pb.InferRequest],
    *,
    clients: int,
    seconds: float,
    timeout: float | None = 30.0,
    channels: int = 4,
    watch_pids: dict[str, int] | None = None,
    report: LoadReport | None = None,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """`clients` closed-loop callers for `seconds` (or until `stop` is set), each call with a `timeout` (None: no
    deadline); every call ends in an answer or a counted error. Pass `report` to watch it fill while the load runs."""
    report = report if report is not None else LoadReport()
    stop = stop or asyncio.Event()
    pool = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [pb_grpc.TierServiceStub(channel) for channel in pool]
    started = time.perf_counter()
    stop_at = started + seconds

    async def client(number: int) -> None:
        stub = stubs[number % len(stubs)]
        for request in itertools.cycle(requests[number % len(requests) :] or requests):
            if time.perf_counter() >= stop_at or stop.is_set():
                return
            report.sent += 1
            sent_at = time.perf_counter()
            try:
                response = await stub.Infer(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                report.errors[exc.code().name] += 1
                report.error_timeline.append((time.perf_counter() - started, exc.code().name))
                continue
            now = time.perf_counter()
            report.answered += 1
            report.degraded += response.degraded
            report.answered_by[response.answered_by] += 1
            report.latencies.append(now - sent_at)
            report.timeline.append((now - started, response.answered_by, response.degraded))

    async def watch_memory() -> None:
        while time.perf_counter() < stop_at and not stop.is_set():
            for name, pid in (watch_pids or {}).items():
                with contextlib.suppress(FileNotFoundError):  # a tier killed on purpose
                    report.peak_rss_bytes[name] = max(report.peak_rss_bytes.get(name, 0), rss_bytes(pid))
            await asyncio.sleep(0.5)

    try:
        await asyncio.gather(watch_memory(), *(client(i) for i in range(clients)))
    finally:
        for channel in pool:
            await channel.close()
    report.seconds = time.perf_counter() - started
    return report


def stack_for(log_dir: Path, policy: list[str]) -> TierProcesses:
    """Three replay tiers over the bundled trace."""
    tuning = ["--max-in-flight", "512"]
    return TierProcesses(
        [[*tier, *tuning, *policy] for tier in replay_tiers(TIER_NAMES, BUNDLED_CHAIN, BUNDLED_TRACE)], log_dir
    )


def load(clients: int, seconds: float) -> LoadReport:
    with tempfile.TemporaryDirectory(prefix="recserve-load-") as logs:
        stack = stack_for(Path(logs), ["--policy", "recserve", "--beta", "0.5"])
        stack.start()
        try:
            pids = {name: stack.pid(i) for i, name in enumerate(TIER_NAMES)}
            target = f"127.0.0.1:{stack.ports[0]}"
            return asyncio.run(run_load(target, demo_requests(), clients=clients, seconds=seconds, watch_pids=pids))
        finally:
            stack.stop()


@dataclass
class ChaosReport:
    load: LoadReport
    killed_at: float  # the edge has exited
    restarting_at: float  # its restart begins
    restarted_at: float  # it reports ready again
    recovered_after: float | None  # seconds from the restart to the first answer from above the device again


def chaos(
    clients: int = 32, phase: float = 5.0, kill: int = signal.SIGKILL, recovery_timeout: float = 45.0
) -> ChaosReport:
    """Load for `phase` seconds, kill (or stop) the edge, load `phase` more seconds with it gone, restart it, and keep
    the load on until the device forwards again (at most `recovery_timeout`). Every request must be answered."""
    with tempfile.TemporaryDirectory(prefix="recserve-chaos-") as logs:
        # Device and edge forward everything, so every request needs the edge while it is down.
        stack = stack_for(Path(logs), ["--policy", "forward-all"])
        stack.start()
        try:
            target = f"127.0.0.1:{stack.ports[0]}"
            marks: dict[str, float] = {}
            report = LoadReport()
            requests = demo_requests()

            async def scenario() -> None:
                stop = asyncio.Event()
                # The load's clock starts within a millisecond of this one: the marks and its timeline compare.
                started = time.perf_counter()
                longest = 2 * phase + 30 + recovery_timeout  # an upper bound; `stop` ends the run earlier
                running = asyncio.ensure_future(
                    run_load(target, requests, clients=clients, seconds=longest, report=report, stop=stop)
                )
                await asyncio.sleep(phase)
                await asyncio.to_thread(stack.stop_one, 1, kill)
                # Marked once the edge is gone: a graceful stop first finishes what it had in flight.
                marks["killed"] = time.perf_counter() - started
                await asyncio.sleep(phase)
                marks["restarting"] = time.perf_counter() - started
                await asyncio.to_thread(stack.start_one, 1)
                marks["restarted"] = time.perf_counter() - started
                await _await_recovery(report, started, marks["restarted"], recovery_timeout)
                stop.set()
                await running

            asyncio.run(scenario())
        finally:
            stack.stop()
    recovered = _recovered(report, marks["restarted"])
    after = None if recovered is None else recovered - marks["restarted"]
    return ChaosReport(report, marks["killed"], marks["restarting"], marks["restarted"], after)


@dataclass
class HangReport:
    """A hung edge under load: how the device fared, and when its breaker noticed."""

    load: LoadReport
    stopped_at: float  # SIGSTOP sent to the edge
    continued_at: float  # SIGCONT sent
    normal: tuple[float, float]  # the device's share of outcomes it answered itself, and its answers/s, before
    hung: tuple[float, float]  # the same while the edge hung
    breaker_opened_after: float | None  # seconds from SIGSTOP until the device's breaker showed open
    breaker_closed_after: float | None  # seconds from SIGCONT until it showed closed again
    resumed_after: float | None  # seconds from SIGCONT to the first answer from above the device

    @property
    def goals(self) -> dict[str, bool]:
        """The issue's goals for a hung peer, each met or not."""
        return {
            "the device answers at least its normal local share, and as many answers/s, while the edge hangs": (
                self.hung[0] >= self.normal[0] and self.hung[1] >= self.normal[1]
            ),
            "every request answered or refused explicitly": self.load.lost == 0
            and set(self.load.errors) <= {"RESOURCE_EXHAUSTED"},
            "the breaker opens within 2 s of the hang": _within(self.breaker_opened_after, 2.0),
            "forwarding resumes within 2 s of SIGCONT": _within(self.resumed_after, 2.0),
        }

    def summary(self) -> str:
        def after(seconds: float | None) -> str:
            return "never" if seconds is None else f"{seconds:.2f}s"

        lines = [
            f"{self.load.summary()}",
            f"device's local share {self.normal[0]:.0%} normally ({self.normal[1]:.0f} answers/s), "
            f"{self.hung[0]:.0%} while the edge hung ({self.hung[1]:.0f} answers/s)",
            f"breaker opened {after(self.breaker_opened_after)} after SIGSTOP; forwarding resumed "
            f"{after(self.resumed_after)} after SIGCONT, breaker closed {after(self.breaker_closed_after)} after",
        ]
        lines += [f"goal {'met' if met else 'MISSED'}: {goal}" for goal, met in self.goals.items()]
        return "\n  ".join(lines)


def hang(clients: int = 100, phase: float = 15.0, recovery_timeout: float = 30.0) -> HangReport:
    """Load for `phase` seconds, hang the edge (SIGSTOP) for `phase` seconds, let it go on (SIGCONT), and keep the
    load on until the device forwards again (at most `recovery_timeout`). Clients set no deadline, and the device
    forwards its usual share (the recserve policy, beta 0.3), so a device that waits on its edge shows at once."""
    with tempfile.TemporaryDirectory(prefix="recserve-hang-") as logs:
        stack = stack_for(Path(logs), ["--policy", "recserve"])
        stack.start()
        pids = {name: stack.pid(i) for i, name in enumerate(TIER_NAMES)}
        edge = pids[TIER_NAMES[1]]
        report = LoadReport()
        marks: dict[str, float] = {}
        breaker: list[tuple[float, bool]] = []  # (seconds since start, open) as scraped from the device

        target = f"127.0.0.1:{stack.ports[0]}"
        requests = demo_requests()

        async def scenario() -> None:
            stop = asyncio.Event()
            # The load's clock starts within a millisecond of this one: the marks and its timeline compare.
            started = time.perf_counter()
            longest = 2 * phase + recovery_timeout + 30  # an upper bound; `stop` ends the run earlier
            running = asyncio.ensure_future(
                run_load(target, requests, clients=clients, seconds=longest, timeout=None, report=report, stop=stop,
                         watch_pids=pids)
            )  # fmt: skip

            async def watch_breaker() -> None:
                while not stop.is_set():
                    is_open = await asyncio.to_thread(device_breaker_open, stack.metrics_ports[0])
                    breaker.append((time.perf_counter() - started, is_open))
                    await asyncio.sleep(0.05)

            watching = asyncio.ensure_future(watch_breaker())
            await asyncio.sleep(phase)
            os.kill(edge, signal.SIGSTOP)
            marks["stopped"] = time.perf_counter() - started
            await asyncio.sleep(phase)
            os.kill(edge, signal.SIGCONT)
            marks["continued"] = time.perf_counter() - started
            await _await_recovery(report, started, marks["continued"], recovery_timeout)
            stop.set()
            await asyncio.gather(running, watching)

        try:
            asyncio.run(scenario())
        finally:
            os.kill(edge, signal.SIGCONT)  # a stopped tier would not act on the SIGTERM that stops the stack
            stack.stop()
    stopped, continued = marks["stopped"], marks["continued"]
    recovered = _recovered(report, continued)
    return HangReport(
        report,
        stopped,
        continued,
        normal=_local_share(report, 1.0, stopped),  # the first second fills the policy's windows
        hung=_local_share(report, stopped, continued),
        breaker_opened_after=next((at - stopped for at, is_open in breaker if at >= stopped and is_open), None),
        breaker_closed_after=next((at - continued for at, is_open in breaker if at >= continued and not is_open), None),
        resumed_after=None if recovered is None else recovered - continued,
    )


def device_breaker_open(metrics_port: int) -> bool:
    """Whether the device's breaker to its next tier is open, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "recserve_upstream_breaker_open":
                return sample.value == 1
    return False  # not set before the first forward


def _local_share(report: LoadReport, start: float, end: float) -> tuple[float, float]:
    """The device's own answers between `start` and `end`: their share of all outcomes then, and their rate."""
    local = sum(1 for at, tier, _ in report.timeline if start <= at < end and tier == "device")
    outcomes = sum(1 for at, *_ in report.timeline if start <= at < end)
    outcomes += sum(1 for at, _ in report.error_timeline if start <= at < end)
    return (local / outcomes if outcomes else 0.0), local / (end - start)


def _within(seconds: float | None, limit: float) -> bool:
    return seconds is not None and seconds <= limit


async def _await_recovery(report: LoadReport, started: float, since: float, timeout: float) -> None:
    """Wait until an answer from above the device arrives after `since` (seconds from `started`), or `timeout`
    passes, then a second more, so the run shows some forwarding after recovery."""
    deadline = since + timeout
    # Polling the report the clients fill is simpler than signalling from every answer.
    while time.perf_counter() - started < deadline and _recovered(report, since) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


def _recovered(report: LoadReport, since: float) -> float | None:
    """When the first answer from above the device arrived after `since`, if one did."""
    return next((at for at, tier, _ in report.timeline if at > since and tier != "device"), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    load_parser = commands.add_parser("load", help="many concurrent clients against three tiers")
    load_parser.add_argument("--clients", type=int, default=200)
    load_parser.add_argument("--seconds", type=float, default=60.0)
    chaos_parser = commands.add_parser("chaos", help="kill, stop or hang the edge tier under load")
    chaos_parser.add_argument("--clients", type=int, default=32)
    chaos_parser.add_argument("--phase", type=float, default=5.0, help="seconds before the fault, and of the fault")
    chaos_parser.add_argument(
        "--signal", choices=("KILL", "TERM", "STOP"), default="KILL", help="STOP: hang the edge, then SIGCONT it"
    )
    args = parser.parse_args(argv)
    if args.command == "load":
        report = load(args.clients, args.seconds)
        print(f"load, {args.clients} clients for {args.seconds:.0f}s: {report.summary()}")
        return 0 if report.lost == 0 and not report.errors else 1
    if args.signal == "STOP":
        hung = hang(args.clients, args.phase)
        print(f"chaos, edge SIGSTOP for {args.phase:.0f}s under {args.clients} clients without deadlines:")
        print(f"  {hung.summary()}")
        return 0 if all(hung.goals.values()) else 1
    result = chaos(args.clients, args.phase, getattr(signal, f"SIG{args.signal}"))
    recovery = "never" if result.recovered_after is None else f"{result.recovered_after:.1f}s after the restart"
    print(
        f"chaos, edge SIG{args.signal}, gone at {result.killed_at:.1f}s, ready again at {result.restarted_at:.1f}s: "
        f"{result.load.summary()}; forwarding resumed {recovery}"
    )
    return 0 if result.load.lost == 0 and not result.load.errors and result.recovered_after is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
