"""Every Prometheus metric a tier or the gateway exports, declared once over a registry passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONFIDENCE_BUCKETS = tuple(i / 20 for i in range(1, 21))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metric families, registered once per registry; label values are bounded (tier and peer
    names, task families, fixed enums), never a request id."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.transmitted_bytes = Counter(
            "recserve_transmitted_bytes",
            "Serialized protobuf bytes on a link, counted by this tier: sent to or received from the peer.",
            ["tier", "peer", "direction"],
            registry=registry,
        )
        self.requests = Counter(
            "recserve_requests",
            "Requests this tier finished, by outcome: answered, forwarded, degraded (answered here because the "
            "next tier failed), rejected (overload) or error.",
            ["tier", "outcome"],
            registry=registry,
        )
        self.judged_answers = Counter(
            "recserve_judged_answers",
            "Answers of this tier judged against a reference or by client feedback, by verdict.",
            ["tier", "family", "verdict"],
            registry=registry,
        )
        self.breaker_open = Gauge(
            "recserve_upstream_breaker_open",
            "1 while this tier's circuit breaker to the next tier is open (it answers itself, degraded).",
            ["tier"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "recserve_in_flight_requests",
            "Requests this tier is serving now (bounded by its max in flight).",
            ["tier"],
            registry=registry,
        )
        self.threshold = Gauge(
            "recserve_threshold",
            "Current offload threshold of this tier for a task family.",
            ["tier", "family"],
            registry=registry,
        )
        self.confidence = Histogram(
            "recserve_confidence",
            "Confidence of this tier's own answers, before the offload decision.",
            ["tier", "family"],
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.engine_seconds = Histogram(
            "recserve_engine_seconds",
            "Time this tier's engine spent generating one answer.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.aborted_generations = Counter(
            "recserve_aborted_generations",
            "Streamed generations this tier's engine stopped before their end: the caller hung up or the deadline "
            "passed.",
            ["tier"],
            registry=registry,
        )
        self.energy = Counter(
            "recserve_energy_joules",
            "Energy this tier accounted, in joules, by kind: inference (its engine's busy time times its power, or per "
            "token), transmission (the bytes on its links up) and idle (its idle power over wall time).",
            ["tier", "kind"],
            registry=registry,
        )
        self.requirements = Counter(
            "recserve_requirements",
            "Requests with a processing-time requirement this tier finished, by whether it was met (from their "
            "arrival at this tier).",
            ["tier", "outcome"],
            registry=registry,
        )
        self.progressive = Counter(
            "recserve_progressive_requests",
            "Long GENERATE requests by the path this tier's progressive scheduler chose (local, cloud-direct, "
            "progressive) and how it ended: served, or fell back (the sketch failed or did not parse, or a point "
            "could not be written) to this tier's own answer.",
            ["tier", "path", "outcome"],
            registry=registry,
        )
        self.progressive_points = Counter(
            "recserve_progressive_points",
            "Sketch points this tier expanded, by outcome: kept (its own expansion), ensemble (written again by its "
            "second model, whose expansion cleared the point threshold) or repaired (written again by the next tier: "
            "its confidence was below the point threshold, or its expansion failed).",
            ["tier", "outcome"],
            registry=registry,
        )
        self.cloud_tokens_saved = Counter(
            "recserve_cloud_tokens_saved",
            "Answer tokens this tier wrote itself on the progressive path, less the tokens of the next tier's sketch: "
            "what the next tier would have generated to answer in full.",
            ["tier"],
            registry=registry,
        )
        self.sketches = Counter(
            "recserve_sketches",
            "Sketches this tier wrote for a tier below, by whether they parsed as a numbered list of points.",
            ["tier", "outcome"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "recserve_request_seconds",
            "End-to-end time of a request at this tier, upstream hops included.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def for_tier(self, tier: str) -> TierMetrics:
        return TierMetrics(self, tier)


class TierMetrics:
    """The metrics of one tier: the families with the tier label bound."""

    def __init__(self, families: Metrics, tier: str) -> None:
        self.families = families
        self.tier = tier

    @classmethod
    def standalone(cls, registry: CollectorRegistry, tier: str) -> TierMetrics:
        """For a process that runs a single tier."""
        return Metrics(registry).for_tier(tier)

    def count_bytes(self, peer: str, *, sent: int, received: int) -> None:
        self.families.transmitted_bytes.labels(self.tier, peer, "sent").inc(sent)
        self.families.transmitted_bytes.labels(self.tier, peer, "received").inc(received)

    def count_outcome(self, outcome: str) -> None:
        self.families.requests.labels(self.tier, outcome).inc()

    def count_energy(self, kind: str, joules: float) -> None:
        if joules > 0:
            self.families.energy.labels(self.tier, kind).inc(joules)

    def count_requirement(self, *, met: bool) -> None:
        self.families.requirements.labels(self.tier, "met" if met else "missed").inc()

    def count_aborted_generation(self) -> None:
        self.families.aborted_generations.labels(self.tier).inc()

    def count_verdict(self, family: str, correct: bool) -> None:
        self.families.judged_answers.labels(self.tier, family, "right" if correct else "wrong").inc()

    def observe_decision(self, family: str, confidence: float, threshold: float, engine_seconds: float) -> None:
        self.families.confidence.labels(self.tier, family).observe(confidence)
        self.families.threshold.labels(self.tier, family).set(threshold)
        self.families.engine_seconds.labels(self.tier).observe(engine_seconds)

    def set_in_flight(self, requests: int) -> None:
        self.families.in_flight.labels(self.tier).set(requests)

    def set_breaker_open(self, is_open: bool) -> None:
        self.families.breaker_open.labels(self.tier).set(1 if is_open else 0)

    def observe_request_seconds(self, seconds: float) -> None:
        self.families.request_seconds.labels(self.tier).observe(seconds)

    def count_progressive(self, path: str, outcome: str) -> None:
        self.families.progressive.labels(self.tier, path, outcome).inc()

    def count_points(self, *, kept: int, repaired: int, ensemble: int = 0) -> None:
        self.families.progressive_points.labels(self.tier, "kept").inc(kept)
        self.families.progressive_points.labels(self.tier, "ensemble").inc(ensemble)
        self.families.progressive_points.labels(self.tier, "repaired").inc(repaired)

    def count_cloud_tokens_saved(self, tokens: int) -> None:
        if tokens > 0:
            self.families.cloud_tokens_saved.labels(self.tier).inc(tokens)

    def count_sketch(self, *, parsed: bool) -> None:
        self.families.sketches.labels(self.tier, "parsed" if parsed else "unparsable").inc()


TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


class GatewayMetrics:
    """The metric families of the OpenAI-compatible HTTP gateway, registered once per registry; `endpoint` is a
    route of the gateway (or "other"), never a raw path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "recserve_gateway_requests",
            "HTTP requests the gateway answered, by endpoint and HTTP status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "recserve_gateway_time_to_first_token_seconds",
            "Streamed completions: time from the request's arrival to its first generated text.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "recserve_gateway_stream_tokens_per_second",
            "Streamed completions: output tokens over the request's whole duration (first token wait included).",
            ["endpoint"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=registry,
        )
        self.output_tokens = Counter(
            "recserve_gateway_output_tokens",
            "Tokens the answering tiers generated for completed requests, streamed or not.",
            ["endpoint"],
            registry=registry,
        )

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_stream(self, endpoint: str, *, first_token_seconds: float | None, seconds: float, tokens: int) -> None:
        if first_token_seconds is not None:
            self.time_to_first_token.labels(endpoint).observe(first_token_seconds)
        if seconds > 0:
            self.tokens_per_second.labels(endpoint).observe(tokens / seconds)

    def count_output_tokens(self, endpoint: str, tokens: int) -> None:
        self.output_tokens.labels(endpoint).inc(tokens)
