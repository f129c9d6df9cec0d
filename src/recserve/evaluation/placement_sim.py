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
- A server is EmulatedEngine's (recserve.engines.emulated), on the shared profiles (recserve.engines.profiles):
  at most batch_limit * replicas requests admitted, the rest in a FIFO queue; a request prefills, then decodes one
  token per step_seconds(b), b the admitted requests per replica. Edge sites run `edge-gpu`, a share `weak_share`
  `edge-box`; a cloud region `cloud_replicas` servers of `cloud-gpu`.
- Energy as EmulatedEngine reports it: the prefill at batch-1 power above idle, each decode step's power above idle
  at its batch shared by the batch (inference energy); every server's idle power over the whole run (idle energy,
  reported per request over all requests: the placement cannot attribute it). A link takes `latency` plus bytes /
  bandwidth each way and `joules_per_byte` (transmission energy: the phone's uplink), with `bytes_per_token` bytes
  per token; links do not contend.
- The placement sees, per request, the time from forwarding to the answer and the inference plus transmission
  energy: a PlacementOutcome, as a live tier would measure it.

Metrics count the requests forwarded between `warmup` and `duration` (the placements learn throughout); requests
still unanswered `drain` seconds after arrivals stop count as missed. All randomness comes from the seed, and the
arrivals (times, groups, classes, sizes) do not depend on the policy: every policy meets the same requests.

    python -m recserve.evaluation.placement_sim --sites 50 --clouds 5 --rates 100,200,400 --policies cs-ucb,random

`--live-setup` runs bench/placement_bench.py's setup instead (simulate_live): its tiers and profiles, its queries and
arrivals (poisson_arrivals, which the bench calls), and every tier's RecServe decision on the confidence its replayed
model recorded, so the two can be compared figure by figure (docs/placement.md, "Live and simulated").

    python -m recserve.evaluation.placement_sim --live-setup --policies cs-ucb,first --rates 8,64
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import sys
from collections import deque
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import simpy

from recserve.client.trace_client import TraceClient
from recserve.core.confidence import choice_scorer, generate_scorer
from recserve.core.engine import GenerationRequest
from recserve.core.placement import Candidate, Placement, PlacementOutcome, PlacementRequest
from recserve.core.traces import BUNDLED_TRACE, TraceQuery, TraceSet
from recserve.engines.profiles import (
    PHONE_JOULES_PER_BYTE,
    PHONE_UPLINK_BYTES_PER_S,
    PROFILES,
    ServerProfile,
    get_profile,
)
from recserve.engines.replay import ReplayEngine
from recserve.policies.placement import PLACEMENT_NAMES, PinnedConfig, placement_config, placement_options
from recserve.policies.simple import RecServeConfig
from recserve.v1 import tier_pb2 as pb

# The placements a 50-site sweep runs by default: all but `pinned`, whose candidate names differ from group to group
# there (it serves --live-setup, e.g. --policies pinned --placement-pin edge-b).
SWEPT_PLACEMENTS = tuple(name for name in PLACEMENT_NAMES if name != PinnedConfig.name)


@dataclass(frozen=True)
class Link:
    """A path from a device group to one candidate. Kept beside the shared profiles because they give a server's
    uplink rate and joules per byte but no latency, and the latency here depends on the pair (own site, another
    site, the nearest or a farther cloud), not on the server."""

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
    # The servers: the shared profiles (recserve.engines.profiles). An edge site runs `edge`, or `weak_edge` at a share
    # `weak_share` of the sites spread evenly; a cloud region runs `cloud_replicas` servers of `cloud` (one model
    # replica a GPU: a 70B model on an H200 has room for a batch of 8 only).
    edge: ServerProfile = PROFILES["edge-gpu"]
    weak_edge: ServerProfile = PROFILES["edge-box"]
    weak_share: float = 0.3
    cloud: ServerProfile = PROFILES["cloud-gpu"]
    cloud_replicas: int = 8
    # The links from a device: the phone's uplink (its rate and joules per byte from the phone profile) and a latency
    # by distance, which the profiles lack: its own site, another site through the metro network, the nearest cloud
    # (each farther one adds cloud_step_seconds).
    home_link: Link = Link(0.005, PHONE_UPLINK_BYTES_PER_S, PHONE_JOULES_PER_BYTE)
    neighbour_link: Link = Link(0.015, PHONE_UPLINK_BYTES_PER_S, PHONE_JOULES_PER_BYTE)
    cloud_link: Link = Link(0.030, PHONE_UPLINK_BYTES_PER_S, PHONE_JOULES_PER_BYTE)
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
    __slots__ = ("done", "energy", "start_energy", "tokens_in", "tokens_out")

    def __init__(self, tokens_in: int, tokens_out: int, done: simpy.Event) -> None:
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out
        self.done = done
        self.energy = 0.0  # inference joules above idle, as EmulatedEngine's `emulated_joules`
        self.start_energy = 0.0


class _Server:
    """EmulatedEngine's server (recserve.engines.emulated) in virtual time: at most batch_limit * replicas requests
    admitted at once, the rest in a FIFO queue; an admitted request prefills for prefill_seconds(tokens_in), then
    decodes tokens_out tokens, each taking step_seconds(b), b = ceil(admitted / replicas) (prefilling ones count, as
    there). Energy as there: the prefill at batch-1 power above idle, and each decode step's power above idle at its
    batch shared by the b requests.

    Only admissions, prefill ends and completions are events: between them b is constant, so every decoding request
    gains tokens at 1 / step_seconds(b) a second and joules at (watts(b) - idle) / b a second. `tokens` and
    `energy_per_job` integrate those rates since the start; a request that starts decoding at `tokens` = T finishes
    at T + tokens_out. The one difference from EmulatedEngine: it samples b at each streamed delta (a word) and steps
    whole tokens, this integrates continuously."""

    def __init__(self, env: simpy.Environment, profile: ServerProfile, replicas: int = 1) -> None:
        self.env = env
        self.profile = profile
        self.replicas = replicas
        self.capacity = profile.batch_limit * replicas
        self.running = 0  # admitted: prefilling or decoding
        self.tokens = 0.0
        self.energy_per_job = 0.0
        self.last = 0.0
        self.decoding: list[tuple[float, int, _Job]] = []  # (tokens at which it finishes, order, job)
        self.waiting: deque[_Job] = deque()
        self.admitted = 0
        self.wake = env.event()
        env.process(self._run())

    def submit(self, tokens_in: int, tokens_out: int) -> _Job:
        job = _Job(tokens_in, max(tokens_out, 1), self.env.event())
        if self.running < self.capacity and not self.waiting:
            self._admit(job)
        else:
            self.waiting.append(job)
        return job

    def _batch(self) -> int:
        return max(-(-self.running // self.replicas), 1)

    def _advance(self) -> None:
        elapsed = self.env.now - self.last
        if elapsed > 0 and self.decoding:
            batch = self._batch()
            self.tokens += elapsed / self.profile.step_seconds(batch)
            above = max(self.profile.watts(batch) - self.profile.idle_watts, 0.0)
            self.energy_per_job += above * elapsed / batch
        self.last = self.env.now

    def _admit(self, job: _Job) -> None:
        self._advance()
        self.running += 1
        self.admitted += 1
        prefill = self.profile.prefill_seconds(job.tokens_in)
        job.energy = prefill * max(self.profile.watts(1) - self.profile.idle_watts, 0.0)
        self._poke()
        self.env.timeout(prefill).callbacks.append(lambda _: self._decode(job))

    def _decode(self, job: _Job) -> None:
        self._advance()
        job.start_energy = self.energy_per_job
        self.admitted += 1
        heapq.heappush(self.decoding, (self.tokens + job.tokens_out, self.admitted, job))
        self._poke()

    def _poke(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def _run(self) -> Generator[simpy.Event, Any, None]:
        while True:
            if self.decoding:
                left = max(self.decoding[0][0] - self.tokens, 0.0)
                yield self.env.timeout(left * self.profile.step_seconds(self._batch())) | self.wake
            else:
                yield self.wake
            if self.wake.triggered:
                self.wake = self.env.event()
            self._advance()
            tolerance = 1e-9 * max(1.0, self.tokens)
            while self.decoding and self.decoding[0][0] <= self.tokens + tolerance:
                _, _, job = heapq.heappop(self.decoding)
                job.energy += self.energy_per_job - job.start_energy
                self.running -= 1
                job.done.succeed()
                if self.waiting:  # the place passes to the next in the queue, as in EmulatedEngine
                    self._admit(self.waiting.popleft())


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
    clouds = [_Server(env, config.cloud, config.cloud_replicas) for _ in range(config.clouds)]
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
        load_at_send = group.in_flight[chosen]
        group.placement.in_flight(chosen, +1)
        group.in_flight[chosen] += 1
        link, server = group.links[chosen], group.servers[chosen]
        bytes_in, bytes_out = tokens_in * config.bytes_per_token, tokens_out * config.bytes_per_token
        yield env.timeout(link.seconds(bytes_in))
        job = server.submit(tokens_in, tokens_out)
        yield job.done
        yield env.timeout(link.seconds(bytes_out))
        seconds = env.now - start
        transmission = (bytes_in + bytes_out) * link.joules_per_byte
        requirement = service.requirement_seconds
        met = requirement is None or seconds <= requirement
        outcome = PlacementOutcome(
            seconds, job.energy + transmission, met, transmission_joules=transmission, load_at_send=load_at_send
        )
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
    # The idle floor of every server over the whole run (inference energy is what a request adds above it).
    idle = sum(server.profile.idle_watts * server.replicas for server in (*edges, *clouds)) * env.now
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


# The live bench's setup (bench/placement_bench.py runs it through real tier processes): the bundled trace's chain, a
# device tier standing for a fleet of phones that places each forwarded request on one of two edge sites or, skipping
# them, the cloud; each edge forwards to the cloud. Every tier decides by RecServe at `beta` on the confidences its
# replayed model recorded.
LIVE_CHAIN = ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b")
LIVE_CLASSES = (ServiceClass("interactive", 0.8, 1.5), ServiceClass("batch", 0.2, 10.0))
# Phones behind the device tier, each serving its own user: the device's own answers never queue. Enough that the
# phones are not the bottleneck at the rates swept: 256 of them saturate at about 365 requests a second at full speed
# and capped every placement alike there, so none separated.
LIVE_PHONES = 4096
LIVE_EDGES = (("edge-a", "edge-box"), ("edge-b", "edge-gpu"))  # (tier, profile)
LIVE_DEVICE_PROFILE = "phone"
LIVE_CLOUD_PROFILE = "cloud-gpu"
# Queries whose recorded answers are at most this long at every tier: a requirement of seconds is about the
# multiple-choice and short answers; a 2000-token essay at 23 tokens/s misses any interactive requirement anywhere.
LIVE_MAX_ANSWER_TOKENS = 32

T = TypeVar("T")


@dataclass(frozen=True)
class Arrival(Generic[T]):
    seconds: float  # since the start of the arrivals
    service: ServiceClass
    item: T


def draw_class(rng: random.Random, classes: Sequence[ServiceClass]) -> ServiceClass:
    """A service class drawn by share (one rng.random() call); the last class takes any remainder."""
    draw = rng.random()
    for service in classes:
        if draw < service.share:
            return service
        draw -= service.share
    return classes[-1]


def poisson_arrivals(
    rate: float, seconds: float, seed: int, items: Sequence[T], classes: Sequence[ServiceClass] = LIVE_CLASSES
) -> list[Arrival[T]]:
    """Poisson arrivals at `rate` a second for `seconds`, each with a service class and an item drawn uniformly: the
    live bench's arrivals (bench/placement_bench.py sends these), so the simulator meets the same requests."""
    rng = random.Random(seed)
    arrivals: list[Arrival[T]] = []
    clock = 0.0
    while True:
        clock += rng.expovariate(rate)
        if clock > seconds:
            return arrivals
        service = draw_class(rng, classes)
        arrivals.append(Arrival(clock, service, rng.choice(items)))


def live_queries(trace_set: TraceSet, chain: Sequence[str] = LIVE_CHAIN) -> list[TraceQuery]:
    """The bench's queries: the test split's, with recorded answers of at most LIVE_MAX_ANSWER_TOKENS at every tier."""
    return [
        query
        for query in trace_set.queries
        if query.split == "test"
        and all(trace_set.answers[query.key][model].tokens_out <= LIVE_MAX_ANSWER_TOKENS for model in chain)
    ]


@dataclass(frozen=True)
class _Answer:
    """What one tier's replayed model gives for a query, as the tier sees it."""

    confidence: float  # the tier's scorer on the replayed generation
    tokens_in: int
    tokens_out: int
    correct: bool
    hop_bytes: int  # the tier's hop in a message


@dataclass(frozen=True)
class _Query:
    family: str
    max_tokens: int  # the request's sampling.max_tokens, which the placement sees
    request_bytes: int  # as the client sends it (requirement and class included)
    answers: tuple[_Answer, ...]  # per tier of the chain

    def sent(self, depth: int) -> int:
        """Bytes of the request forwarded from tier `depth`: the client's and the hops so far."""
        return self.request_bytes + sum(answer.hop_bytes for answer in self.answers[: depth + 1])

    def received(self, answered: int, hops: int) -> int:
        """Bytes of the response from tier `answered` (at chain depth), carrying `hops` hops."""
        # request id, answer, answered_by, confidence, usage, finish reason; then the hops.
        return 100 + self.answers[answered].hop_bytes + sum(answer.hop_bytes for answer in self.answers[:hops])


def _live_query_table(trace_set: TraceSet, queries: Sequence[TraceQuery], chain: Sequence[str]) -> list[_Query]:
    """Each query's confidence at every tier, computed as the tiers compute it (the replay engine's generation through
    the default scorers), its recorded token counts and verdicts, and message sizes for transmission energy."""
    client = TraceClient(trace_set, chain)
    engines = [ReplayEngine(BUNDLED_TRACE, model) for model in chain]
    score_generation, score_choice = generate_scorer("perplexity"), choice_scorer("option_probability")

    async def table() -> list[_Query]:
        for engine in engines:
            await engine.start()
        rows = []
        for query in queries:
            request = client.request(query)
            request.requirement_seconds = 10.0
            request.service_class = "interactive"
            options = tuple(request.options)
            generation_request = GenerationRequest(
                prompt=query.user_prompt, system_prompt=query.system_prompt, options=options,
                max_tokens=request.sampling.max_tokens,
            )  # fmt: skip
            answers = []
            for engine, model in zip(engines, chain, strict=True):
                generation = await engine.generate(generation_request)
                score = score_choice(generation, options) if options else score_generation(generation)
                recorded = trace_set.answers[query.key][model]
                hop = pb.Hop(tier="edge-a", confidence=0.5, threshold=0.5, engine_seconds=0.5, answer=recorded.answer,
                             decision=pb.DECISION_FORWARDED, inference_joules=1.0, bytes_sent=1000,
                             bytes_received=1000, transmission_joules=0.001)  # fmt: skip
                answers.append(_Answer(score.value, generation.prompt_tokens, generation.completion_tokens,
                                       recorded.correct, hop.ByteSize() + 3))  # fmt: skip
            rows.append(_Query(query.benchmark, request.sampling.max_tokens, request.ByteSize(), tuple(answers)))
        return rows

    return asyncio.run(table())


@dataclass(frozen=True)
class LiveSetup:
    """The live bench's setup, for the simulator; `hop_overhead_seconds` is the time a gRPC hop (client to device,
    tier to tier) takes in the live stack beyond the emulated servers' time: Python, protobuf and loopback."""

    policy_beta: float = 0.5  # RecServe's beta at every tier
    seconds: float = 20.0  # arrivals per rate
    warmup: float = 10.0  # seconds of arrivals at the first rate, unmeasured
    seed: int = 1
    phones: int = LIVE_PHONES
    hop_overhead_seconds: float = 0.0


@dataclass(frozen=True)
class LivePoint:
    """The bench's figures for one policy and rate (bench/placement_bench.py's Point, less bytes)."""

    policy: str
    rate: float
    requests: int
    met: float
    accuracy: float
    joules_per_request: float  # inference and transmission, per answered request
    idle_joules_per_request: float
    p50_seconds: float
    p95_seconds: float
    shares: tuple[tuple[str, float], ...]  # where the device's forwarded requests went, and the device itself


# Not a placement: every request straight to the cloud, the tiers below forwarding without generating
# (OFFLOAD_MODE_LAST_TIER through the cloud-only placement): cloud-only serving, the energy goal's reference.
CLOUD_SERVING = "cloud-serving"


def simulate_live(
    policy: str,
    rates: Sequence[float],
    setup: LiveSetup = LiveSetup(),
    options: Mapping[str, Any] | None = None,
    table: Sequence[_Query] | None = None,
) -> list[LivePoint]:
    """The live bench's run for one placement: a warm-up at the first rate, then each rate in turn, on one stack (the
    policies keep what they learnt), each rate's requests all answered before the next rate starts. `policy` is a
    placement, or CLOUD_SERVING."""
    if table is None:
        trace_set = TraceSet.load(BUNDLED_TRACE, LIVE_CHAIN)
        table = _live_query_table(trace_set, live_queries(trace_set), LIVE_CHAIN)
    queries = table
    env = simpy.Environment()
    device = _Server(env, get_profile(LIVE_DEVICE_PROFILE), setup.phones)
    edges = {name: _Server(env, get_profile(profile)) for name, profile in LIVE_EDGES}
    cloud = _Server(env, get_profile(LIVE_CLOUD_PROFILE))
    servers = {"device": device, **edges, "cloud": cloud}
    offload = {name: RecServeConfig(beta=setup.policy_beta).build() for name in servers}
    serving_from_cloud = policy == CLOUD_SERVING
    placement = placement_config("cloud-only" if serving_from_cloud else policy, dict(options or {})).build()
    candidates = (*(Candidate(name, 1) for name in edges), Candidate("cloud", 2))
    usable = [True] * len(candidates)
    in_flight = [0] * len(candidates)  # the device's requests at each candidate, as a live tier's links count them
    # Each tier's idle energy as a live tier accounts it: idle watts over the time since its last request ended.
    idle = dict.fromkeys(servers, 0.0)
    last_end: dict[str, float | None] = dict.fromkeys(servers, None)
    overhead = setup.hop_overhead_seconds

    def ended(tier: str) -> None:
        previous = last_end[tier]
        if previous is not None:
            idle[tier] += servers[tier].profile.idle_watts * (env.now - previous)
        last_end[tier] = env.now

    def at_cloud(query: _Query) -> Generator[Any, Any, float]:
        answer = query.answers[2]
        job = cloud.submit(answer.tokens_in, answer.tokens_out)
        yield job.done
        offload["cloud"].decide(query.family, answer.confidence, is_last=True)
        ended("cloud")
        return job.energy

    def at_edge(name: str, query: _Query) -> Generator[Any, Any, tuple[float, float, int]]:
        """(inference and transmission energy from this edge up, the transmission part, the chain depth that
        answered)"""
        answer = query.answers[1]
        job = edges[name].submit(answer.tokens_in, answer.tokens_out)
        yield job.done
        verdict = offload[name].decide(query.family, answer.confidence, is_last=False)
        energy, link, depth = job.energy, 0.0, 1
        if verdict.forward:
            yield env.timeout(overhead)
            energy += yield from at_cloud(query)
            depth = 2
            link = (query.sent(1) + query.received(2, 3)) * edges[name].profile.joules_per_byte
            energy += link
        ended(name)
        return energy, link, depth

    def request(
        arrival: Arrival[_Query], record: list[tuple[float, bool, float, str, bool]]
    ) -> Generator[Any, Any, None]:
        query, started = arrival.item, env.now
        yield env.timeout(overhead)  # client to device
        arrived = env.now
        answer = query.answers[0]
        if serving_from_cloud:
            # The device forwards without generating (the same message sizes are counted as a cascade's crossing,
            # whose hops carry the lower tiers' answers: a slight overcount of its transmission energy).
            energy, forward = 0.0, True
        else:
            job = device.submit(answer.tokens_in, answer.tokens_out)
            yield job.done
            energy = job.energy
            forward = offload["device"].decide(query.family, answer.confidence, is_last=False).forward
        where, depth = "device", 0
        if forward:
            placing = PlacementRequest(
                family=query.family,
                requirement_seconds=arrival.service.requirement_seconds - (env.now - arrived)
                if arrival.service.requirement_seconds is not None
                else None,
                service_class=arrival.service.name,
                prompt_tokens=answer.tokens_in,
                max_tokens=query.max_tokens,
            )
            chosen = placement.choose(placing, candidates, usable)
            load_at_send = in_flight[chosen]
            in_flight[chosen] += 1
            placement.in_flight(chosen, +1)
            sent_at = env.now
            yield env.timeout(overhead)
            where = candidates[chosen].name
            if where == "cloud":
                above, link, depth = (yield from at_cloud(query)), 0.0, 2
                received = query.received(2, 2)
            else:
                above, link, depth = yield from at_edge(where, query)
                received = query.received(depth, depth + 1)
            transmission = (query.sent(0) + received) * device.profile.joules_per_byte
            seconds = env.now - sent_at
            requirement = placing.requirement_seconds
            met = requirement is None or seconds <= requirement
            outcome = PlacementOutcome(
                seconds, transmission + above, met, transmission_joules=transmission + link, load_at_send=load_at_send
            )
            placement.observe(placing, candidates, chosen, outcome)
            in_flight[chosen] -= 1
            placement.in_flight(chosen, -1)
            energy += transmission + above
        ended("device")
        latency = env.now - started
        limit = arrival.service.requirement_seconds
        record.append((latency, limit is None or latency <= limit, energy, where, query.answers[depth].correct))

    points: list[LivePoint] = []

    def run() -> Generator[Any, Any, None]:
        phases = [(rates[0], setup.warmup, setup.seed - 1, False)]
        phases += [(rate, setup.seconds, setup.seed + index, True) for index, rate in enumerate(rates)]
        for rate, seconds, seed, measured in phases:
            record: list[tuple[float, bool, float, str, bool]] = []
            idle_before = sum(idle.values())
            start = env.now
            processes = []
            for arrival in poisson_arrivals(rate, seconds, seed, queries, LIVE_CLASSES):
                yield env.timeout(max(start + arrival.seconds - env.now, 0.0))
                processes.append(env.process(request(arrival, record)))
            yield env.all_of(processes)
            if measured:
                points.append(_live_point(policy, rate, record, sum(idle.values()) - idle_before))

    env.process(run())
    env.run()
    return points


def _live_point(policy: str, rate: float, record: list[tuple[float, bool, float, str, bool]], idle: float) -> LivePoint:
    count = max(len(record), 1)
    latencies = sorted(item[0] for item in record) or [0.0]
    places: dict[str, int] = {}
    for item in record:
        places[item[3]] = places.get(item[3], 0) + 1
    return LivePoint(
        policy=policy,
        rate=rate,
        requests=len(record),
        met=sum(item[1] for item in record) / count,
        accuracy=sum(item[4] for item in record) / count,
        joules_per_request=sum(item[2] for item in record) / count,
        idle_joules_per_request=idle / count,
        # As the bench takes them.
        p50_seconds=latencies[len(latencies) // 2],
        p95_seconds=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        shares=tuple((where, places[where] / count) for where in sorted(places)),
    )


def format_live(points: Sequence[LivePoint]) -> str:
    lines = [f"{'policy':<13}{'rate/s':>8}{'reqs':>6}{'met':>8}{'J/req':>8}{'idle J':>8}{'acc':>7}{'p50 s':>7}"
             f"{'p95 s':>7}  shares"]  # fmt: skip
    for point in points:
        shares = ", ".join(f"{where} {share:.0%}" for where, share in point.shares)
        lines.append(
            f"{point.policy:<13}{point.rate:>8g}{point.requests:>6}{point.met:>8.1%}{point.joules_per_request:>8.2f}"
            f"{point.idle_joules_per_request:>8.2f}{point.accuracy:>7.3f}{point.p50_seconds:>7.2f}"
            f"{point.p95_seconds:>7.2f}  {shares}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Sweep:
    results: tuple[SimResult, ...]

    def sustained(self, policy: str, target: float = 0.95) -> float:
        """The highest rate of the sweep up to which `policy` met at least `target` of the requirements (0: none)."""
        return sustained_rate(((r.rate, r.met) for r in self.results if r.policy == policy), target)


def sustained_rate(points: Iterable[tuple[float, float]], target: float = 0.95) -> float:
    """Of (rate, share met) points, the highest rate up to which every point met at least `target` (0: none): what
    this project calls the rate a setup sustains, in the simulator and the live benchmarks alike."""
    best = 0.0
    for rate, met in sorted(points):
        if met < target:
            break
        best = rate
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
    parser.add_argument("--cloud-replicas", type=int, default=8, help="cloud-gpu servers in each cloud region")
    parser.add_argument("--groups", type=int, default=0, help="device groups (0: one per site)")
    parser.add_argument("--neighbours", type=int, default=2, help="other edge sites each group may place on")
    parser.add_argument(
        "--rates", default=None, help="device requests per second, comma-separated (default 100,...,600; "
        "with --live-setup 8,64)"
    )  # fmt: skip
    parser.add_argument("--policies", default=None, help="placements, comma-separated (default all but pinned; with "
                        "--live-setup cs-ucb,first; there also cloud-serving: every request to the cloud)")  # fmt: skip
    parser.add_argument("--forward-share", type=float, default=0.3, help="share of requests devices forward")
    parser.add_argument("--duration", type=float, default=180.0, help="simulated seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=None, help="simulated seconds not measured (default 60; "
                        "with --live-setup the bench's warm-up at the first rate, 10)")  # fmt: skip
    parser.add_argument("--slots", type=int, default=32, help="in flight per group and candidate")
    parser.add_argument("--weak-share", type=float, default=0.3, help="share of the edge sites that are edge-box")
    parser.add_argument(
        "--central", action="store_true", help="one placement for all groups over every server (PerLLM's scheduler)"
    )
    parser.add_argument("--trace", default=None, help="a trace folder for request sizes ('bundled': the bundled one)")
    parser.add_argument("--trace-model", default=None, help="the trace model whose token counts to use")
    parser.add_argument("--seed", type=int, default=None, help="default 0; with --live-setup the bench's, 1")
    parser.add_argument(
        "--live-setup",
        action="store_true",
        help="simulate bench/placement_bench.py's setup instead: its tiers, queries, arrivals and figures",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="--live-setup: arrivals per rate")
    parser.add_argument("--beta", type=float, default=0.5, help="--live-setup: RecServe's beta at every tier")
    parser.add_argument(
        "--hop-overhead", type=float, default=0.0, help="--live-setup: seconds a gRPC hop adds (client to device, "
        "tier to tier)"
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    for spec in placement_options():
        parser.add_argument(spec.flag, type=spec.parse, default=argparse.SUPPRESS, help=spec.help)
    args = parser.parse_args(argv)
    default_policies = "cs-ucb,first" if args.live_setup else ",".join(SWEPT_PLACEMENTS)
    policies = [name.strip() for name in (args.policies or default_policies).split(",") if name.strip()]
    known = (*PLACEMENT_NAMES, CLOUD_SERVING) if args.live_setup else PLACEMENT_NAMES
    unknown = [name for name in policies if name not in known]
    if unknown:
        parser.error(f"unknown placements {unknown}; choose from {', '.join(known)}")
    default_rates = "8,64" if args.live_setup else "100,200,300,400,500,600"
    rates = [float(rate) for rate in (args.rates or default_rates).split(",") if rate.strip()]
    options = {spec.name: getattr(args, spec.name) for spec in placement_options() if hasattr(args, spec.name)}
    if args.live_setup:
        setup = LiveSetup(
            policy_beta=args.beta,
            seconds=args.seconds,
            warmup=10.0 if args.warmup is None else args.warmup,
            seed=1 if args.seed is None else args.seed,
            hop_overhead_seconds=args.hop_overhead,
        )
        trace_set = TraceSet.load(BUNDLED_TRACE, LIVE_CHAIN)
        table = _live_query_table(trace_set, live_queries(trace_set), LIVE_CHAIN)
        points = [point for policy in policies for point in simulate_live(policy, rates, setup, options, table)]
        if args.json != "-":
            print(format_live(points))
        if args.json:
            _write_json(args.json, {"setup": asdict(setup), "options": options,
                                    "results": [asdict(point) for point in points]})  # fmt: skip
        return 0
    config = SimConfig(
        sites=args.sites,
        clouds=args.clouds,
        cloud_replicas=args.cloud_replicas,
        groups=args.groups,
        neighbours=args.neighbours,
        forward_share=args.forward_share,
        duration=args.duration,
        warmup=60.0 if args.warmup is None else args.warmup,
        slots=args.slots,
        weak_share=args.weak_share,
        central=args.central,
        seed=0 if args.seed is None else args.seed,
    )
    trace = BUNDLED_TRACE if args.trace == "bundled" else args.trace
    sizes = trace_sizes(trace, args.trace_model) if trace else fixed_sizes(seed=config.seed)
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
        _write_json(args.json, document)
    return 0


def _write_json(destination: str, document: Mapping[str, Any]) -> None:
    text = json.dumps(document, indent=2, default=str)
    if destination == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(destination).write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
