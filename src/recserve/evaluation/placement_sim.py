"""A discrete-event simulator (SimPy) of placement at scales one machine cannot run: many device groups forwarding
to many edge sites and a few clouds, each device group's tier driving its own placement object, the same objects
(recserve.policies.placement) the live tiers use.

The model (docs/placement.md says more):

- Device groups (one per edge site unless told otherwise) send requests; arrivals over all groups are Poisson at
  `rate` per second, each to a group drawn uniformly. The cascade's confidence decision is a share: a request is
  forwarded with probability `forward_share` (the device answers the rest, which the simulator does not follow);
  the placement then picks where the forwarded request goes. Each request has a service class (a share of the
  traffic and a processing-time requirement, counted from the forward) and a size (prompt and output tokens) drawn
  from a trace's recorded `tokens_in`/`tokens_out` or, without a trace, from a fixed distribution.
- A group's candidates: its home edge site, `neighbours` other sites (farther: more link latency) and every cloud
  (level 2, the cloud nearest the group first); with `central`, one placement object serves every group over every
  server (PerLLM's central scheduler). A share `weak_share` of the sites, spread evenly, run a weaker box. At most
  `slots` of a group's requests are in flight at one candidate (the live tier's slot limit: a candidate with none
  free is not usable); with none usable the request is refused and counts as missed.
- A server runs continuous batching as processor sharing: a request needs `tokens_in / prefill + tokens_out /
  decode` seconds alone (its work); with b requests in the batch each advances at 1 / (1 + a·(b - 1)) of that
  speed (a step costs more as the batch grows), up to `batch_limit` requests; the rest wait in a FIFO queue, so
  queues form when arrivals exceed what the batch can serve.
- Energy: a server draws `busy_watts` (all of it, idle floor included) while its batch is not empty, shared equally
  by the requests in the batch (inference energy), and `idle_watts` while it is empty (idle energy, reported per
  request over all requests: the placement cannot attribute it). A link takes `latency` plus bytes / bandwidth each
  way and `joules_per_byte` (transmission energy), with `bytes_per_token` bytes per token; links do not contend.
- The placement sees, per request, the time from forwarding to the answer and the inference plus transmission
  energy: a PlacementOutcome, as a live tier would measure it.

Metrics count the requests forwarded between `warmup` and `duration` (the placements learn throughout); requests
still unanswered `drain` seconds after arrivals stop count as missed. All randomness comes from the seed, and the
arrivals (times, groups, classes, sizes) do not depend on the policy: every policy meets the same requests.

    python -m recserve.evaluation.placement_sim --sites 50 --clouds 5 --rates 100,200,400 --policies cs-ucb,random
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import simpy

from recserve.core.placement import Candidate, Placement, PlacementOutcome, PlacementRequest
from recserve.core.traces import BUNDLED_TRACE, TraceSet
from recserve.policies.placement import PLACEMENT_NAMES, placement_config, placement_options


@dataclass(frozen=True)
class ServerProfile:
    """What one server can do. PLACEHOLDER figures below: to be replaced by the shared engine profiles
    (recserve.engines.profiles) once they exist."""

    name: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # per sequence, at batch 1
    batch_limit: int
    batch_slowdown: float  # a: with b in the batch each step takes (1 + a·(b - 1)) times as long
    busy_watts: float  # drawn while the batch is not empty (idle floor included)
    idle_watts: float  # drawn while it is empty

    def work_seconds(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in / self.prefill_tokens_per_s + tokens_out / self.decode_tokens_per_s


# PLACEHOLDER numbers, of the right order only: an 8B model on an edge box (a small GPU); a 70B model on a cloud
# node of four GPUs (tensor-parallel), its host and cooling included; an on-device model (a phone; not a placement
# target here). Per generated token at a full batch the edge box spends about 0.6 J, the cloud node about 2.5 J (a
# model nine times larger); at batch 1 about 2.7 J and 90 J.
PHONE = ServerProfile("phone", 200.0, 15.0, 1, 0.0, 6.0, 0.5)
EDGE_BOX = ServerProfile("edge-box", 2_000.0, 30.0, 8, 0.10, 80.0, 20.0)
WEAK_EDGE_BOX = ServerProfile("weak-edge-box", 600.0, 10.0, 4, 0.15, 45.0, 12.0)  # an older box or a CPU-only one
CLOUD_GPU = ServerProfile("cloud-gpu", 20_000.0, 45.0, 64, 0.01, 4_000.0, 1_000.0)


@dataclass(frozen=True)
class Link:
    latency_seconds: float  # one way
    bytes_per_second: float
    joules_per_byte: float

    def seconds(self, size: int) -> float:
        return self.latency_seconds + size / self.bytes_per_second


@dataclass(frozen=True)
class ServiceClass:
    name: str
    share: float  # of the forwarded requests
    requirement_seconds: float | None  # from the forward to the answer; None: no requirement


DEFAULT_CLASSES = (
    ServiceClass("interactive", 0.3, 5.0),
    ServiceClass("standard", 0.5, 15.0),
    ServiceClass("background", 0.2, 60.0),
)


@dataclass(frozen=True)
class SimConfig:
    sites: int = 50
    clouds: int = 5
    groups: int = 0  # device groups; 0: one per site
    neighbours: int = 2  # other edge sites a group may place on
    central: bool = False  # one placement for all groups, over every server (PerLLM's central scheduler)
    forward_share: float = 0.3  # of device requests the confidence policy forwards
    duration: float = 180.0  # seconds of arrivals
    warmup: float = 60.0  # requests forwarded before this are not measured (the placements learn meanwhile)
    drain: float = 60.0  # seconds after the arrivals stop before unanswered requests count as missed
    slots: int = 32  # of one group's requests in flight at one candidate
    edge: ServerProfile = EDGE_BOX
    weak_edge: ServerProfile = WEAK_EDGE_BOX
    weak_share: float = 0.3  # of the edge sites, spread evenly, that are weak_edge boxes
    cloud: ServerProfile = CLOUD_GPU
    home_link: Link = Link(0.005, 12.5e6, 1e-6)  # device to its site: ~100 Mbit/s radio
    neighbour_link: Link = Link(0.015, 12.5e6, 2e-6)  # to another site, through the metro network
    cloud_link: Link = Link(0.030, 12.5e6, 4e-6)  # to the nearest cloud; each farther one adds cloud_step
    cloud_step_seconds: float = 0.015
    bytes_per_token: int = 4
    classes: tuple[ServiceClass, ...] = DEFAULT_CLASSES
    seed: int = 0


Sizes = tuple[tuple[int, int], ...]  # (tokens_in, tokens_out) to draw from


def fixed_sizes(count: int = 4096, seed: int = 0) -> Sizes:
    """Request sizes without a trace: prompts log-normal around 150 tokens, outputs exponential with mean 64
    (1 to 512)."""
    rng = random.Random(seed)
    return tuple(
        (max(1, round(rng.lognormvariate(math.log(150), 0.5))), min(512, max(1, round(rng.expovariate(1 / 64)))))
        for _ in range(count)
    )


def trace_sizes(folder: str | Path, model: str | None = None) -> Sizes:
    """The recorded (tokens_in, tokens_out) of one model's answers in a trace folder (its last, usually largest,
    model unless told)."""
    traces = TraceSet.load(folder, None if model is None else [model])
    if not traces.models:
        raise ValueError(f"{folder}: no answers of model {model!r}")
    chosen = model or traces.models[-1]
    sizes = tuple(
        (answer.tokens_in, max(answer.tokens_out, 1))
        for answers in traces.answers.values()
        if (answer := answers.get(chosen)) is not None and answer.tokens_in > 0
    )
    if not sizes:
        raise ValueError(f"{folder}: model {chosen!r} records no token counts")
    return sizes


@dataclass(frozen=True)
class SimResult:
    policy: str
    rate: float  # device requests per second, all groups together
    forwarded: int  # measured forwarded requests
    met: float  # share of them that met their requirement
    refused: int
    unfinished: int
    inference_joules: float  # per answered request
    transmission_joules: float  # per answered request
    idle_joules: float  # the servers' idle energy over the run, per answered request
    mean_seconds: float  # of answered requests
    p95_seconds: float  # unanswered ones count as infinite
    edge_share: float  # of placements, on an edge site
    queue: tuple[int, ...] = field(default=())  # requests waiting for a batch slot, all servers, each tenth of the run
    met_by_class: tuple[tuple[str, float], ...] = ()  # share met per service class
    edge_by_class: tuple[tuple[str, float], ...] = ()  # share placed on an edge site per service class

    @property
    def energy_joules(self) -> float:
        return self.inference_joules + self.transmission_joules + self.idle_joules


class _Job:
    __slots__ = ("done", "energy", "start_energy", "work")

    def __init__(self, work: float, done: simpy.Event) -> None:
        self.work = work
        self.done = done
        self.energy = 0.0
        self.start_energy = 0.0


class _Server:
    """Continuous batching as processor sharing, in virtual time: `attained` is the work (solo seconds) each job in
    the batch has received since the start, so a job finishes when it reaches its admission's value plus its work,
    and only arrivals and completions are events."""

    def __init__(self, env: simpy.Environment, profile: ServerProfile) -> None:
        self.env = env
        self.profile = profile
        self.attained = 0.0
        self.energy_per_job = 0.0  # joules each job in the batch has been charged since the start
        self.last = 0.0
        self.batch: list[tuple[float, int, _Job]] = []  # (attained at which it finishes, order, job)
        self.waiting: deque[_Job] = deque()
        self.busy_seconds = 0.0
        self.idle_seconds = 0.0
        self.admitted = 0
        self.wake = env.event()
        env.process(self._run())

    def submit(self, work: float) -> _Job:
        self._advance()
        job = _Job(work, self.env.event())
        if len(self.batch) < self.profile.batch_limit:
            self._admit(job)
        else:
            self.waiting.append(job)
        if not self.wake.triggered:
            self.wake.succeed()
        return job

    def _speed(self) -> float:
        return 1.0 / (1.0 + self.profile.batch_slowdown * (len(self.batch) - 1))

    def _advance(self) -> None:
        elapsed = self.env.now - self.last
        if elapsed > 0:
            if self.batch:
                self.attained += elapsed * self._speed()
                self.energy_per_job += self.profile.busy_watts * elapsed / len(self.batch)
                self.busy_seconds += elapsed
            else:
                self.idle_seconds += elapsed
        self.last = self.env.now

    def _admit(self, job: _Job) -> None:
        job.start_energy = self.energy_per_job
        self.admitted += 1
        heapq.heappush(self.batch, (self.attained + job.work, self.admitted, job))

    def _run(self) -> Generator[simpy.Event, Any, None]:
        while True:
            if self.batch:
                wait = max(self.batch[0][0] - self.attained, 0.0) / self._speed()
                yield self.env.timeout(wait) | self.wake
            else:
                yield self.wake
            if self.wake.triggered:
                self.wake = self.env.event()
            self._advance()
            tolerance = 1e-9 * max(1.0, self.attained)
            while self.batch and self.batch[0][0] <= self.attained + tolerance:
                _, _, job = heapq.heappop(self.batch)
                job.energy = self.energy_per_job - job.start_energy
                job.done.succeed()
                if self.waiting:
                    self._admit(self.waiting.popleft())

    def close(self) -> None:
        self._advance()


@dataclass
class _Group:
    candidates: tuple[Candidate, ...]
    servers: tuple[_Server, ...]
    links: tuple[Link, ...]
    placement: Placement
    in_flight: list[int]


@dataclass
class _Tally:
    total: int = 0  # answered, measured or not
    answered: int = 0
    met: int = 0
    refused: int = 0
    inference: float = 0.0
    transmission: float = 0.0
    on_edge: int = 0
    seconds: list[float] = field(default_factory=list)
    measured: dict[str, int] = field(default_factory=dict)  # per service class
    met_by_class: dict[str, int] = field(default_factory=dict)
    edge_by_class: dict[str, int] = field(default_factory=dict)


def simulate(
    policy: str,
    rate: float,
    config: SimConfig = SimConfig(),
    sizes: Sizes | None = None,
    options: Mapping[str, Any] | None = None,
) -> SimResult:
    """One run: `policy` (a placement name, with `options`) at `rate` device requests per second."""
    sizes = sizes or fixed_sizes(seed=config.seed)
    env = simpy.Environment()
    edges = [
        _Server(
            env,
            config.weak_edge
            if math.floor((site + 1) * config.weak_share) > math.floor(site * config.weak_share)
            else config.edge,
        )
        for site in range(config.sites)
    ]
    clouds = [_Server(env, config.cloud) for _ in range(config.clouds)]
    groups = _groups(edges, clouds, config, policy, options or {})
    tally = _Tally()
    measured = [0]
    queue: list[int] = []

    def request(group: _Group, service: ServiceClass, tokens_in: int, tokens_out: int) -> Generator[Any, Any, None]:
        start = env.now
        counted = config.warmup <= start < config.duration
        if counted:
            measured[0] += 1
            tally.measured[service.name] = tally.measured.get(service.name, 0) + 1
        placement_request = PlacementRequest(
            family="sim",
            requirement_seconds=service.requirement_seconds,
            service_class=service.name,
            prompt_tokens=tokens_in,
            max_tokens=tokens_out,
        )
        usable = [count < config.slots for count in group.in_flight]
        if not any(usable):
            tally.refused += counted
            return
        chosen = group.placement.choose(placement_request, group.candidates, usable)
        group.placement.in_flight(chosen, +1)
        group.in_flight[chosen] += 1
        link, server = group.links[chosen], group.servers[chosen]
        bytes_in, bytes_out = tokens_in * config.bytes_per_token, tokens_out * config.bytes_per_token
        yield env.timeout(link.seconds(bytes_in))
        job = server.submit(server.profile.work_seconds(tokens_in, tokens_out))
        yield job.done
        yield env.timeout(link.seconds(bytes_out))
        seconds = env.now - start
        transmission = (bytes_in + bytes_out) * link.joules_per_byte
        requirement = service.requirement_seconds
        met = requirement is None or seconds <= requirement
        outcome = PlacementOutcome(seconds, job.energy + transmission, met)
        group.placement.observe(placement_request, group.candidates, chosen, outcome)
        group.placement.in_flight(chosen, -1)
        group.in_flight[chosen] -= 1
        tally.total += 1
        if counted:
            tally.answered += 1
            tally.met += met
            tally.inference += job.energy
            tally.transmission += transmission
            tally.on_edge += group.candidates[chosen].level == 1
            tally.seconds.append(seconds)
            tally.met_by_class[service.name] = tally.met_by_class.get(service.name, 0) + met
            on_edge = group.candidates[chosen].level == 1
            tally.edge_by_class[service.name] = tally.edge_by_class.get(service.name, 0) + on_edge

    def arrivals() -> Generator[Any, Any, None]:
        rng = random.Random(config.seed)
        forwarded_rate = rate * config.forward_share
        weights = [service.share for service in config.classes]
        while forwarded_rate > 0:
            yield env.timeout(rng.expovariate(forwarded_rate))
            if env.now >= config.duration:
                return
            group = groups[rng.randrange(len(groups))]
            service = rng.choices(config.classes, weights)[0]
            tokens_in, tokens_out = sizes[rng.randrange(len(sizes))]
            env.process(request(group, service, tokens_in, tokens_out))

    def watch_queue() -> Generator[Any, Any, None]:
        for _ in range(10):
            yield env.timeout(config.duration / 10)
            queue.append(sum(len(server.waiting) for server in (*edges, *clouds)))

    env.process(arrivals())
    env.process(watch_queue())
    env.run(until=config.duration + config.drain)
    idle = 0.0
    for server in (*edges, *clouds):
        server.close()
        idle += server.idle_seconds * server.profile.idle_watts
    answered = max(tally.answered, 1)
    latencies = sorted(tally.seconds) + [math.inf] * (measured[0] - tally.answered)  # refused, unfinished
    return SimResult(
        policy=policy,
        rate=rate,
        forwarded=measured[0],
        met=tally.met / measured[0] if measured[0] else 1.0,
        refused=tally.refused,
        unfinished=measured[0] - tally.answered - tally.refused,
        inference_joules=tally.inference / answered,
        transmission_joules=tally.transmission / answered,
        # The whole run's idle energy over every answered request, the unmeasured ones included.
        idle_joules=idle / max(tally.total, 1),
        mean_seconds=sum(tally.seconds) / answered if tally.seconds else math.nan,
        p95_seconds=latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else math.nan,
        edge_share=tally.on_edge / answered,
        queue=tuple(queue),
        met_by_class=tuple(
            (name, tally.met_by_class.get(name, 0) / count) for name, count in sorted(tally.measured.items())
        ),
        edge_by_class=tuple(
            (name, tally.edge_by_class.get(name, 0) / count) for name, count in sorted(tally.measured.items())
        ),
    )


def _groups(
    edges: list[_Server], clouds: list[_Server], config: SimConfig, policy: str, options: Mapping[str, Any]
) -> list[_Group]:
    count = config.groups or config.sites
    if not config.central:
        return [
            _group(index, edges, clouds, config, _placement(policy, options, config, index)) for index in range(count)
        ]
    # One placement for every group (PerLLM's central scheduler): the same candidates, in the same order, for all,
    # and one count of requests in flight per server.
    placement = _placement(policy, options, config, 0)
    groups = [_group(index, edges, clouds, config, placement) for index in range(count)]
    in_flight = [0] * len(groups[0].candidates)
    for group in groups:
        group.in_flight = in_flight
    return groups


def _placement(policy: str, options: Mapping[str, Any], config: SimConfig, index: int) -> Placement:
    # Each group's own seed, so that seeded placements do not all draw alike.
    return placement_config(policy, {"placement_seed": config.seed * 100_003 + index, **options}).build()


def _group(index: int, edges: list[_Server], clouds: list[_Server], config: SimConfig, placement: Placement) -> _Group:
    home = index % len(edges)
    if config.central:  # every site, in one order; the group's own site over its own link
        sites = list(range(len(edges)))
        cloud_order = list(range(len(clouds)))
    else:  # its own site first, then its neighbours; the nearest cloud first
        sites = [(home + step) % len(edges) for step in range(min(config.neighbours, len(edges) - 1) + 1)]
        cloud_order = [(index + rank) % len(clouds) for rank in range(len(clouds))]
    candidates = [Candidate(f"edge-{site}", 1) for site in sites]
    servers = [edges[site] for site in sites]
    links = [config.home_link if site == home else config.neighbour_link for site in sites]
    for cloud in cloud_order:
        rank = (cloud - index) % len(clouds)  # how far the cloud is from the group
        candidates.append(Candidate(f"cloud-{cloud}", 2))
        servers.append(clouds[cloud])
        base = config.cloud_link
        links.append(Link(base.latency_seconds + rank * config.cloud_step_seconds, base.bytes_per_second,
                          base.joules_per_byte))  # fmt: skip
    return _Group(tuple(candidates), tuple(servers), tuple(links), placement, [0] * len(candidates))


@dataclass(frozen=True)
class Sweep:
    results: tuple[SimResult, ...]

    def sustained(self, policy: str, target: float = 0.95) -> float:
        """The highest rate of the sweep up to which `policy` met at least `target` of the requirements (0: none)."""
        best = 0.0
        for result in sorted((r for r in self.results if r.policy == policy), key=lambda r: r.rate):
            if result.met < target:
                break
            best = result.rate
        return best


def sweep(
    policies: Sequence[str],
    rates: Sequence[float],
    config: SimConfig = SimConfig(),
    sizes: Sizes | None = None,
    options: Mapping[str, Any] | None = None,
) -> Sweep:
    return Sweep(tuple(simulate(policy, rate, config, sizes, options) for policy in policies for rate in rates))


def format_table(result: Sweep) -> str:
    header = (
        f"{'policy':<13}{'rate/s':>8}{'fwd':>7}{'met':>7}{'J/req':>8}{'infer':>8}{'tran':>7}{'idle':>7}"
        f"{'mean s':>8}{'p95 s':>8}{'edge':>6}{'queue':>7}{'sustain':>9}"
    )
    lines = [header]
    for item in result.results:
        lines.append(
            f"{item.policy:<13}{item.rate:>8g}{item.forwarded:>7}{item.met:>7.1%}{item.energy_joules:>8.1f}"
            f"{item.inference_joules:>8.1f}{item.transmission_joules:>7.3f}{item.idle_joules:>7.1f}"
            f"{item.mean_seconds:>8.2f}{item.p95_seconds:>8.2f}{item.edge_share:>6.0%}"
            f"{(item.queue[-1] if item.queue else 0):>7}{result.sustained(item.policy):>9g}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=50, help="edge sites")
    parser.add_argument("--clouds", type=int, default=5)
    parser.add_argument("--groups", type=int, default=0, help="device groups (0: one per site)")
    parser.add_argument("--neighbours", type=int, default=2, help="other edge sites each group may place on")
    parser.add_argument(
        "--rates", default="100,200,300,400,500,600", help="device requests per second, comma-separated"
    )
    parser.add_argument("--policies", default=",".join(PLACEMENT_NAMES), help="placements, comma-separated")
    parser.add_argument("--forward-share", type=float, default=0.3, help="share of requests devices forward")
    parser.add_argument("--duration", type=float, default=180.0, help="simulated seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=60.0, help="simulated seconds not measured")
    parser.add_argument("--slots", type=int, default=32, help="in flight per group and candidate")
    parser.add_argument("--weak-share", type=float, default=0.3, help="share of the edge sites that are weak boxes")
    parser.add_argument(
        "--central", action="store_true", help="one placement for all groups over every server (PerLLM's scheduler)"
    )
    parser.add_argument("--trace", default=None, help="a trace folder for request sizes ('bundled': the bundled one)")
    parser.add_argument("--trace-model", default=None, help="the trace model whose token counts to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    for spec in placement_options():
        parser.add_argument(spec.flag, type=spec.parse, default=argparse.SUPPRESS, help=spec.help)
    args = parser.parse_args(argv)
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    unknown = [name for name in policies if name not in PLACEMENT_NAMES]
    if unknown:
        parser.error(f"unknown placements {unknown}; choose from {', '.join(PLACEMENT_NAMES)}")
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    config = SimConfig(
        sites=args.sites,
        clouds=args.clouds,
        groups=args.groups,
        neighbours=args.neighbours,
        forward_share=args.forward_share,
        duration=args.duration,
        warmup=args.warmup,
        slots=args.slots,
        weak_share=args.weak_share,
        central=args.central,
        seed=args.seed,
    )
    trace = BUNDLED_TRACE if args.trace == "bundled" else args.trace
    sizes = trace_sizes(trace, args.trace_model) if trace else fixed_sizes(seed=args.seed)
    options = {spec.name: getattr(args, spec.name) for spec in placement_options() if hasattr(args, spec.name)}
    result = sweep(policies, rates, config, sizes, options)
    if args.json != "-":
        print(format_table(result))
    if args.json:
        document = {
            "config": asdict(config),
            "sizes": "fixed" if not trace else str(args.trace),
            "options": options,
            "results": [asdict(item) | {"energy_joules": item.energy_joules} for item in result.results],
            "sustained": {policy: result.sustained(policy) for policy in policies},
        }
        text = json.dumps(document, indent=2, default=str)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
