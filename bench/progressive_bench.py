"""Progressive inference (PICE) under load: long-form answers through an edge and a cloud, cloud-only against
progressive, Poisson arrivals at rising rates.

Two real tier processes on loopback: the edge runs llama.cpp on the tiny edge model, the cloud vLLM on the tiny cloud
model, each wrapped in an emulated server (`--emulate`: an edge GPU, `edge-gpu`, and a cloud GPU serving a 70B
model, `cloud-gpu`: its speed, batch and queue), so that time and capacity are the profiles' while the text, token
counts and log-probs are the real engines'. `--speed` slows every server alike (0.5: twice as slow as its profile), so
that the cloud saturates at rates this host's processes can drive; rates are given as loads, multiples of the cloud's
capacity for full answers (its batch over a full answer's time at that batch).

The edge runs with `--progressive on`. Its clients send every bundled long-form question (Vicuna's 80; the sketch
router sends those it finds unsuited to a sketch cloud-direct, and under load the scheduler keeps some local), as
GENERATE requests of up to `--max-tokens` tokens, in two setups measured in turns at each rate, the same arrival times
and questions for both:

- cloud-only: the requests ask for the last tier (OFFLOAD_MODE_LAST_TIER): the edge relays them, the cloud answers;
- progressive: automatic offload: the edge's scheduler picks progressive (the cloud sketches, the edge expands every
  point and has the cloud write again the points it is unsure of), cloud-direct or local (the edge answers, and its
  confidence may still forward the question: the cascade).

Per setup and rate: goodput (requests answered within the latency bound, per second of arrivals), p50 and p95
latency, answer tokens (mean, and the share of answers of 200 tokens or more), cloud tokens per request (what the
cloud generated: the whole answer on the cloud paths; the sketch and the repaired points on the progressive path,
from the hop records), the share of requests on each path, and the share of points repaired. A rate is sustained when
at least 95% of its requests are answered within the bound (`--slo-factor` times a full answer's time on an idle
cloud). Goals (the issue): at least 2x the highest sustained rate of cloud-only, and at least 40% lower p50 latency,
at equal answer length, for answers of 200 tokens or more.

The tiny models write random text; only its length and log-probs matter here. Check from the output that the answers
are long in both setups and that the emulated time dominates: the "emulated time" line gives the share of the
measured times, at the lowest load, that the profiles account for (the cloud's for a cloud-only request, the edge's
for a point it expanded). Each turn starts once the host's load average is low (--quiet-load), and the table gives
it at the end of each turn. Measured figures: docs/progressive.md, "Measured".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from recserve.engines.profiles import get_profile
from recserve.evaluation.placement_sim import sustained_rate
from recserve.policies.sketch_router import LabelledQuestion, SketchRouter, load_questions
from recserve.server.processes import TierProcesses
from recserve.tools.models import make_tiny_models
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

SETUPS = {"cloud-only": pb.OFFLOAD_MODE_LAST_TIER, "progressive": pb.OFFLOAD_MODE_AUTO}
CLOUD_ONLY, PROGRESSIVE = SETUPS
MET_TARGET = 0.95  # share of requests answered within the bound for a rate to count as sustained
OVERLOADED = 0.5  # a setup that answers fewer within the bound at a load is not measured at higher loads
THROUGHPUT_GOAL = 2.0
P50_GOAL = 0.40  # at least this much lower p50 latency than cloud-only
LONG_ANSWER = 200  # tokens: the goals are for answers this long or longer
PATHS = ("cloud", "progressive", "cloud-direct", "local", "local->cloud")


@dataclass
class Outcome:
    """One request: how long it took and what each tier wrote for it."""

    qid: int
    seconds: float
    ok: bool
    suited: bool = False  # the sketch router's verdict on the question
    path: str = ""
    answer_tokens: int = 0
    cloud_tokens: int = 0
    points: int = 0
    repaired: int = 0
    error: str = ""
    # Progressive: (engine seconds, tokens) of each point the edge kept, and the prompt tokens of a point.
    kept_points: list[tuple[float, int]] = field(default_factory=list)
    point_prompt_tokens: float = 0.0


@dataclass
class Turn:
    setup: str
    load: float
    rate: float
    seconds: float  # of arrivals
    outcomes: list[Outcome]
    fallbacks: int = 0  # progressive requests that fell back to the edge's own answer (edge metrics)
    host_load: float = 0.0  # the host's 1-minute load average when the turn ended


@dataclass
class Row:
    setup: str
    load: float
    rate: float  # arrivals a second, as drawn
    requests: int
    goodput: float  # requests answered within the bound, per second of arrivals
    met: float  # share answered within the bound
    errors: int
    p50: float
    p95: float
    p50_long: float  # p50 leaving out answers shorter than LONG_ANSWER tokens (a failed request stays in)
    p50_suited: float  # p50 over the questions the router finds suited to a sketch
    p50_unsuited: float
    # Median share of the measured time that the profiles account for: cloud-only requests' latency, and the edge's
    # engine time on each point it kept (100%: the tiny engines and the tiers add nothing to the emulated servers).
    cloud_emulated: float
    edge_emulated: float
    tokens: float  # mean answer tokens
    long_share: float  # share of answers of LONG_ANSWER tokens or more
    cloud_tokens: float  # per answered request
    repaired: float  # share of progressive points written again by the cloud
    fallbacks: int
    host_load: float  # the highest 1-minute load average at the end of a turn
    paths: dict[str, float] = field(default_factory=dict)


def tier_arguments(models: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    # Generous limits: the bench measures the emulated servers' queues, not the tiers' admission limits, nor the
    # breaker (a fixed forward timeout far beyond any request's deadline: no call is slow before its caller gives up).
    common = ["--max-in-flight", "4096", "--forward-timeout", "600", "--forward-timeout-min", "600",
              "--max-tokens", "4096", "--emulate-speed", str(args.speed)]  # fmt: skip
    return [
        ["--tier", "edge", "--engine", "llama_cpp", "--model", str(models["edge"].gguf), "--threads", "1",
         "--emulate", args.edge_profile, "--progressive", "on", *common],
        ["--tier", "cloud", "--engine", "vllm", "--model", str(models["cloud"].hf_dir),
         "--emulate", args.cloud_profile, *common],
    ]  # fmt: skip


def full_answer_seconds(profile_name: str, tokens: int, batch: int, speed: float) -> float:
    """Wall time of an answer of `tokens` on the emulated server decoding `batch` sequences at once."""
    profile = get_profile(profile_name)
    return tokens * profile.step_seconds(batch) / speed


def cloud_capacity(args: argparse.Namespace) -> float:
    """Full answers a second the cloud serves with its batch full: a load of 1."""
    batch = get_profile(args.cloud_profile).batch_limit
    return batch / full_answer_seconds(args.cloud_profile, args.max_tokens, batch, args.speed)


def arrivals(rate: float, seconds: float, seed: int, count: int) -> list[tuple[float, int]]:
    """Poisson arrival times within `seconds`, each with a question index; the questions cycle through a seeded
    shuffle, so a short run still meets many different questions."""
    rng = random.Random(seed)
    order: list[int] = []
    found: list[tuple[float, int]] = []
    clock = rng.expovariate(rate)
    while clock <= seconds:
        if not order:
            order = rng.sample(range(count), count)
        found.append((clock, order.pop()))
        clock += rng.expovariate(rate)
    return found


def classify(response: pb.InferResponse, setup: str, cloud: str = "cloud") -> Outcome:
    """Path, answer tokens, cloud tokens, points and repairs of one answered request, from its hop records."""
    outcome = Outcome(qid=-1, seconds=0.0, ok=True, answer_tokens=response.usage.completion_tokens)
    first = response.hops[0]
    if response.degraded:
        # The edge answered because the cloud did not in time: neither setup's way of serving; a failure in both.
        outcome.ok, outcome.path, outcome.error = False, "degraded", "degraded"
        return outcome
    if first.decision == pb.DECISION_PROGRESSIVE:
        expansions = first.progressive.expansions
        kept = sum(e.completion_tokens for e in expansions if not e.repaired_by)
        outcome.path = "progressive"
        outcome.points = len(expansions)
        outcome.repaired = sum(1 for e in expansions if e.repaired_by)
        outcome.kept_points = [(e.engine_seconds, e.completion_tokens) for e in expansions if not e.repaired_by]
        outcome.point_prompt_tokens = response.usage.prompt_tokens / max(len(expansions), 1)
        # The answer's tokens are the kept points' (written here) and the repaired points' (written above).
        outcome.cloud_tokens = first.progressive.sketch_tokens + response.usage.completion_tokens - kept
    elif response.answered_by == cloud:
        outcome.cloud_tokens = response.usage.completion_tokens
        if setup == CLOUD_ONLY:
            outcome.path = "cloud"
        elif first.engine_seconds > 0:
            outcome.path = "local->cloud"  # the edge answered, was unsure, and forwarded (the cascade)
        else:
            outcome.path = "cloud-direct"
    else:
        outcome.path = "local"
    return outcome


def fallbacks(metrics_port: int) -> int:
    """Progressive requests the edge answered another way after the sketch or a point failed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "recserve_progressive_requests_total"
            and sample.labels.get("path") == "progressive"
            and sample.labels.get("outcome") != "served"
        )
    )


async def run_turn(
    target: str, questions: list[LabelledQuestion], setup: str, rate: float, seconds: float, seed: int,
    args: argparse.Namespace,
) -> list[Outcome]:  # fmt: skip
    """Poisson arrivals at `rate` for `seconds`; every request waits at most `timeout` (then it counts as failed, and
    its cancellation frees the tiers for the next turn)."""
    outcomes: list[Outcome] = []
    router = SketchRouter.load()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TierServiceStub(channel)

        async def one(number: int, question: LabelledQuestion) -> None:
            suited = router.suits(question.question)
            request = pb.InferRequest(
                request_id=f"{setup}-{seed}-{number}",
                task=pb.TASK_KIND_GENERATE,
                prompt=question.question,
                offload=SETUPS[setup],
            )
            request.sampling.max_tokens = args.max_tokens
            started = time.perf_counter()
            try:
                response = await stub.Infer(request, timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                seconds = time.perf_counter() - started
                outcomes.append(Outcome(question.qid, seconds, False, suited, error=exc.code().name))
                return
            outcome = classify(response, setup)
            outcome.qid, outcome.seconds, outcome.suited = question.qid, time.perf_counter() - started, suited
            outcomes.append(outcome)

        tasks = []
        started = time.perf_counter()
        for number, (at, index) in enumerate(arrivals(rate, seconds, seed, len(questions))):
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(number, questions[index])))
        await asyncio.gather(*tasks)
    return outcomes


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(turns: list[Turn], args: argparse.Namespace) -> Row:
    """One row of the table: the turns of one setup at one load."""
    limit = bound(args)
    cloud, edge = get_profile(args.cloud_profile), get_profile(args.edge_profile)
    first = turns[0]
    outcomes = [o for t in turns for o in t.outcomes]
    seconds = sum(t.seconds for t in turns)
    answered = [o for o in outcomes if o.ok]
    within = [o for o in answered if o.seconds <= limit]
    latencies = [o.seconds if o.ok else float("inf") for o in outcomes]  # a failed request is never fast
    long = [
        latency for o, latency in zip(outcomes, latencies, strict=True) if not o.ok or o.answer_tokens >= LONG_ANSWER
    ]
    points = sum(o.points for o in answered)
    count = max(len(answered), 1)
    return Row(
        setup=first.setup,
        load=first.load,
        rate=len(outcomes) / seconds,
        requests=len(outcomes),
        goodput=len(within) / seconds,
        met=len(within) / max(len(outcomes), 1),
        errors=len(outcomes) - len(answered),
        p50=_quantile(latencies, 0.5),
        p95=_quantile(latencies, 0.95),
        p50_long=_quantile(long, 0.5),
        p50_suited=_quantile([latency for o, latency in zip(outcomes, latencies, strict=True) if o.suited], 0.5),
        p50_unsuited=_quantile([latency for o, latency in zip(outcomes, latencies, strict=True) if not o.suited], 0.5),
        tokens=sum(o.answer_tokens for o in answered) / count,
        long_share=sum(o.answer_tokens >= LONG_ANSWER for o in answered) / count,
        cloud_tokens=sum(o.cloud_tokens for o in answered) / count,
        repaired=sum(o.repaired for o in answered) / points if points else 0.0,
        fallbacks=sum(t.fallbacks for t in turns),
        host_load=max(t.host_load for t in turns),
        cloud_emulated=_median(
            [o.answer_tokens * cloud.step_seconds(1) / args.speed / o.seconds for o in answered if o.path == "cloud"]
        ),
        edge_emulated=_median(
            [
                (edge.prefill_seconds(round(o.point_prompt_tokens)) + tokens * edge.step_seconds(1)) / args.speed / took
                for o in answered
                for took, tokens in o.kept_points
                if took > 0
            ]
        ),
        paths={
            path: sum(o.path == path for o in answered) / count
            for path in PATHS
            if any(o.path == path for o in answered)
        },
    )


def measure(args: argparse.Namespace, logs: Path) -> list[Turn]:
    """Both setups at every rate, in turns (their order alternating from rate to rate and round to round), so that a
    change in the machine's load falls on both alike."""
    models = make_tiny_models(args.models_dir)
    questions = load_questions()
    stack = TierProcesses(tier_arguments(models, args), logs)
    capacity = cloud_capacity(args)
    turns: list[Turn] = []
    try:
        wait_for_quiet_host(args)
        stack.start(timeout=600.0)
        # The tiny engines share this host's cores with the tiers and the clients (and whatever else runs on it): a
        # busy host slows them until they, not the emulated servers, set the pace. The report checks; this says why.
        print(f"host load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)
        target = f"127.0.0.1:{stack.ports[0]}"
        edge_metrics = stack.metrics_ports[0]
        # Unmeasured: the engines' first requests (vLLM compiles the sketch grammar once), the edge's point windows
        # and its learned answer length start from traffic, not from nothing.
        print(f"warm-up: {args.warmup:.0f} s of progressive arrivals at load 1", flush=True)
        asyncio.run(run_turn(target, questions, PROGRESSIVE, capacity, args.warmup, args.seed - 1, args))
        for round_ in range(args.rounds):
            overloaded: set[str] = set()  # setups that failed most requests at a lower load: not run higher
            for index, load in enumerate(args.loads):
                rate = load * capacity
                seed = args.seed + index  # both setups meet the same arrivals and questions at a rate
                order = list(args.setups) if (index + round_) % 2 == 0 else list(reversed(args.setups))
                for setup in order:
                    if setup in overloaded:
                        print(f"  round {round_ + 1} {setup:>12} load {load:4.2f}: not run (overloaded at a lower "
                              "load)", flush=True)  # fmt: skip
                        continue
                    wait_for_quiet_host(args)
                    before = fallbacks(edge_metrics)
                    outcomes = asyncio.run(run_turn(target, questions, setup, rate, args.seconds, seed, args))
                    turn = Turn(setup, load, rate, args.seconds, outcomes, fallbacks(edge_metrics) - before,
                                os.getloadavg()[0])  # fmt: skip
                    turns.append(turn)
                    row = summarise([turn], args)
                    if row.met < OVERLOADED:
                        overloaded.add(setup)
                    print(f"  round {round_ + 1} {setup:>12} load {load:4.2f} ({rate:5.3f}/s): {row.requests:3d} req, "
                          f"met {row.met:.2f}, p50 {row.p50:6.1f} s, p95 {row.p95:6.1f} s, {row.tokens:5.0f} tok, "
                          f"cloud {row.cloud_tokens:5.0f} tok, {_paths(row)}", flush=True)  # fmt: skip
                    time.sleep(2.0)  # cancelled requests leave the tiers
        print(f"host load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        stack.stop()
    return turns


def wait_for_quiet_host(args: argparse.Namespace) -> None:
    """Start a turn only once the host's 1-minute load average is below --quiet-load (or --quiet-wait has passed): the
    tiny engines share the cores with everything else on the host, and a busy host, not the emulated servers, would
    set the pace. The table shows each turn's load average, so a turn that met a busy host anyway can be seen."""
    deadline = time.monotonic() + args.quiet_wait
    said = False
    while os.getloadavg()[0] >= args.quiet_load and time.monotonic() < deadline:
        if not said:
            print(f"  waiting for the host to quieten (load average {os.getloadavg()[0]:.1f})", flush=True)
            said = True
        time.sleep(5.0)


def bound(args: argparse.Namespace) -> float:
    """The latency bound: slo_factor times a full answer on an idle cloud."""
    return args.slo_factor * full_answer_seconds(args.cloud_profile, args.max_tokens, 1, args.speed)


def sustained(rows: list[Row]) -> float:
    """The highest load met at MET_TARGET, every lower load too (0: none)."""
    return sustained_rate(((row.load, row.met) for row in rows), MET_TARGET)


def _paths(row: Row) -> str:
    return ", ".join(f"{path} {share:.0%}" for path, share in row.paths.items())


def _seconds(value: float, limit: float) -> str:
    return f">{limit:.0f}" if value > limit else f"{value:.1f}"


def report(rows: list[Row], args: argparse.Namespace) -> None:
    limit = bound(args)
    print(f"\n{len(load_questions())} long-form questions, max_tokens {args.max_tokens}, edge {args.edge_profile} and "
          f"cloud {args.cloud_profile} at speed {args.speed} (rates below are wall-clock; at full speed they are "
          f"{1 / args.speed:g}x), {args.seconds:.0f} s of arrivals per rate and setup, {args.rounds} round(s); "
          f"bound {limit:.1f} s ({args.slo_factor:g}x a full answer on an idle cloud)")  # fmt: skip
    header = (f"{'setup':>12} {'load':>5} {'req/s':>6} {'n':>4} {'goodput/s':>9} {'met':>5} {'p50 s':>6} "
              f"{'p95 s':>6} {'p50>=200':>8} {'tok/ans':>7} {'>=200':>5} {'cloud tok':>9} {'repaired':>8} "
              f"{'host':>4} paths")  # fmt: skip
    print(header)
    for row in rows:
        paths = _paths(row)
        fell = f", {row.fallbacks} fell back" if row.fallbacks else ""
        errors = f", {row.errors} failed" if row.errors else ""
        print(f"{row.setup:>12} {row.load:5.2f} {row.rate:6.3f} {row.requests:4d} {row.goodput:9.3f} {row.met:5.2f} "
              f"{_seconds(row.p50, args.timeout):>6} {_seconds(row.p95, args.timeout):>6} "
              f"{_seconds(row.p50_long, args.timeout):>8} {row.tokens:7.0f} {row.long_share:5.0%} "
              f"{row.cloud_tokens:9.0f} {row.repaired:8.0%} {row.host_load:4.1f} {paths}{fell}{errors}")  # fmt: skip
    by_setup = {setup: [r for r in rows if r.setup == setup] for setup in SETUPS}
    cloud, progressive = by_setup[CLOUD_ONLY], by_setup[PROGRESSIVE]
    if not cloud or not progressive:
        return  # one setup alone: the table is all there is
    print(
        f"\nemulated time, at load {cloud[0].load:g} (100%: the tiny engines and the tiers add nothing): the cloud "
        f"profile's decode time at batch 1 is a median {cloud[0].cloud_emulated:.0%} of a cloud-only request's "
        f"latency; the edge profile's time at batch 1 a median {progressive[0].edge_emulated:.0%} of the edge's "
        "engine time on a point it kept"
    )
    print("p50 by the router's verdict (suited / unsuited to a sketch):")
    for row in rows:
        print(f"  {row.setup:>12} load {row.load:4.2f}: {_seconds(row.p50_suited, args.timeout):>6} s / "
              f"{_seconds(row.p50_unsuited, args.timeout):>6} s")  # fmt: skip
    ours, theirs = sustained(progressive), sustained(cloud)
    if theirs == 0:
        print("cloud-only sustains none of the loads: no throughput ratio (measure at lower --loads)")
    else:
        ratio = ours / theirs
        verdict = "meets" if ratio >= THROUGHPUT_GOAL else "misses"
        print(f"throughput: progressive sustains load {ours:g}, cloud-only {theirs:g} (>= {MET_TARGET:.0%} within "
              f"{limit:.0f} s): {ratio:.2f}x, {verdict} the {THROUGHPUT_GOAL:g}x goal (the loads' grid bounds the "
              "ratio's resolution)")  # fmt: skip
    met: list[str] = []
    prog_at = {row.load: row for row in progressive}
    for row_cloud, row_prog in ((row, prog_at[row.load]) for row in cloud if row.load in prog_at):
        lower = _lower(row_prog.p50, row_cloud.p50, args.timeout)
        lower_long = _lower(row_prog.p50_long, row_cloud.p50_long, args.timeout)
        verdict = "meets" if min(lower[0], lower_long[0]) >= P50_GOAL else "misses"
        if verdict == "meets":
            met.append(f"{row_cloud.load:g}")
        print(f"load {row_cloud.load:g}: p50 {lower[1]} lower than cloud-only ({lower_long[1]} leaving out answers "
              f"under {LONG_ANSWER} tokens), {verdict} the {P50_GOAL:.0%} goal; answers {row_prog.tokens:.0f} against "
              f"{row_cloud.tokens:.0f} tokens; cloud tokens per request {row_prog.cloud_tokens:.0f} against "
              f"{row_cloud.cloud_tokens:.0f}; over the questions the router finds suited alone (not the goal), p50 "
              f"{_lower(row_prog.p50_suited, row_cloud.p50_suited, args.timeout)[1]} lower")  # fmt: skip
    compared = ", ".join(f"{row.load:g}" for row in cloud if row.load in prog_at)
    print(f"p50 goal met at loads: {', '.join(met) or 'none'} of {compared}")


def _lower(ours: float, theirs: float, timeout: float) -> tuple[float, str]:
    """How much lower `ours` is than `theirs`, as a share and as text; a p50 past the timeout (half the requests or
    more failed) is known only to be at least the timeout."""
    if math.isinf(ours):
        return -math.inf, "not (progressive's p50 is past the timeout):"
    if math.isinf(theirs):
        share = 1 - ours / timeout
        return share, f"at least {share:.0%}"
    share = 1 - ours / theirs
    return share, f"{share:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="tiny models are made here if absent")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0],
                        help="arrival rates as multiples of the cloud's capacity for full answers")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=40.0, help="arrivals per rate and setup")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="measure these only (one alone: no comparison)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of unmeasured arrivals first")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every rate and setup, pooled")
    parser.add_argument("--max-tokens", type=int, default=256, help="of every answer (200 or more: long-form)")
    parser.add_argument("--speed", type=float, default=0.5,
                        help="every server's wall-time speed against its profile (0.5: twice as slow)")  # fmt: skip
    parser.add_argument("--edge-profile", default="edge-gpu")
    parser.add_argument("--cloud-profile", default="cloud-gpu")
    parser.add_argument("--slo-factor", type=float, default=2.0,
                        help="latency bound: this many times a full answer's time on an idle cloud")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds a request may take before it counts as failed (0: 1.25x the bound)")  # fmt: skip
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=(os.cpu_count() or 1) + 1.0,
        help="start each turn once the host's 1-minute load average is below this (default: cores + 1)",
    )
    parser.add_argument("--quiet-wait", type=float, default=300.0, help="wait at most this long for it, then go on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args()
    args.timeout = args.timeout or 1.25 * bound(args)
    with tempfile.TemporaryDirectory(prefix="recserve-progressive-bench-") as folder:
        turns = measure(args, Path(folder))
    rows = [
        summarise(measured, args)
        for setup in SETUPS
        for load in args.loads
        if (measured := [t for t in turns if t.setup == setup and t.load == load])
    ]
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    report(rows, args)


if __name__ == "__main__":
    main()
