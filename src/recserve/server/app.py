"""Run a tier as a gRPC server: health, reflection, metrics endpoint and graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from recserve.core.breaker import CircuitBreaker
from recserve.core.engine import Engine
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.links import UNKNOWN_PEER, Link
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.core.validation import TierLimits
from recserve.engines import create_engine
from recserve.engines.power import detect_power_reader
from recserve.server.metrics_http import MetricsEndpoint
from recserve.server.security import server_credentials, token, upstream_credentials
from recserve.server.servicer import SERVICE_NAME, TierServicer, add_tier_service
from recserve.server.settings import TierSettings
from recserve.server.upstream import GrpcUpstream

logger = logging.getLogger(__name__)

# How often a serving tier asks its engine whether it still works.
ENGINE_CHECK_SECONDS = 5.0


class StartupError(Exception):
    """A tier cannot start as configured (a port in use, an unreadable token file); the message says which."""


SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: two tiers given the same port would then share it silently, the kernel
    # splitting connections between them. A port clash must fail at start-up instead.
    ("grpc.so_reuseport", 0),
    # Accept the keepalive pings our upstream channels send every 30 s instead of answering GOAWAY.
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A lower tier keeps one long-lived connection to this one, and a Kubernetes Service balances connections,
    # not requests: ending connections after a few minutes makes callers reconnect and spread over new replicas.
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 1000),
]


def server_options(limits: TierLimits) -> list[tuple[str, int]]:
    # No request within the tier's limits is bigger, hops included: anything bigger (a padded or unknown field, a
    # message that decompresses to megabytes) is refused before it is parsed or held in memory.
    return [*SERVER_OPTIONS, ("grpc.max_receive_message_length", limits.max_request_bytes)]


@dataclass
class RunningTier:
    """A started tier: its server, ports and the pieces a graceful shutdown has to stop in order."""

    settings: TierSettings
    tier: Tier
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics_port: int
    registry: CollectorRegistry
    servicer: TierServicer
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def watch_engine(self, interval: float) -> None:
        """Return once the engine says it can no longer serve (a crashed vLLM engine core does not come back),
        with health already NOT_SERVING so that probes and load balancers stop sending requests here."""
        # Polled: engines answer whether they are healthy; none announces its failure.
        while True:
            if not await self.tier.engine.healthy():
                break
            await asyncio.sleep(interval)
        logger.error("tier %s: the %s engine stopped working", self.settings.tier, self.settings.engine)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish within `grace`, then release the engine."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.tier.engine.shutdown()
        if self.tier.ensemble is not None:
            await self.tier.ensemble.shutdown()
        await self.tier.links.close()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()


async def start_tier(
    settings: TierSettings, *, engine: Engine | None = None, registry: CollectorRegistry | None = None
) -> RunningTier:
    """Start serving: health says NOT_SERVING until the engine has loaded, then SERVING. StartupError when a port
    or a token file is not usable."""
    registry = registry or CollectorRegistry()
    try:
        auth_token = token(settings.auth_token, settings.auth_token_file)
        upstream_auth_token = token(settings.upstream_auth_token, settings.upstream_auth_token_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read a token: {exc}") from None
    engine = engine or create_engine(settings.engine, settings.engine_config)
    ensemble_config = settings.ensemble_engine_config
    ensemble = create_engine(settings.engine, ensemble_config) if ensemble_config is not None else None
    tier = Tier(
        settings.tier,
        engine,
        settings.policy.build(),
        TierMetrics.standalone(registry, settings.tier),
        limits=settings.limits,
        scorer=settings.scorer,
        choice_scorer_name=settings.choice_scorer,
        max_forwarding=settings.forward_slots,
        callers=settings.caller_names,
        links=_links(settings, upstream_auth_token),
        placement=settings.placement.build(),
        energy=settings.energy_model,
        power=detect_power_reader() if settings.power_reader == "auto" else None,
        stream_interval=settings.stream_interval,
        capacity=settings.serving_capacity,
        progressive=settings.progressive_scheduler.build() if settings.progressive == "on" else None,
        progressive_options=settings.progressive_options,
        ensemble=ensemble,
    )
    server = grpc.aio.server(options=server_options(settings.limits))
    servicer = TierServicer(
        tier,
        max_in_flight=settings.max_in_flight,
        auth_token=auth_token,
        callers_by_certificate=bool(settings.tls_client_ca),
    )
    add_tier_service(server, servicer)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        port = _add_port(server, settings)
    except StartupError:
        await tier.links.close()
        raise
    await server.start()

    metrics = MetricsEndpoint(registry) if settings.metrics_port else None
    running = RunningTier(settings, tier, server, health_servicer, port, 0, registry, servicer, metrics)
    try:
        if metrics is not None:
            running.metrics_port = await _start_metrics(metrics, settings)
        await engine.start()
        if ensemble is not None:
            await ensemble.start()
    except BaseException:
        await running.stop(grace=0)
        raise
    if tier.callers and not (auth_token or settings.tls_client_ca):
        logger.warning(
            "tier %s takes forwarded requests from %s without authenticating them: anyone who reaches its port "
            "can send hops in their name. Give it --auth-token (their --upstream-auth-token) or --tls-client-ca",
            settings.tier,
            ", ".join(sorted(tier.callers)),
        )
    servicer.ready = True
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "tier %s serving on port %d (metrics %s, next %s, engine %s, policy %s, placement %s)",
        settings.tier,
        port,
        running.metrics_port or "off",
        ", ".join(c.name or c.address for c in settings.candidates) or "none",
        settings.engine,
        settings.policy.name,
        settings.placement.name,
    )
    return running


def _add_port(server: grpc.aio.Server, settings: TierSettings) -> int:
    address = f"{settings.host}:{settings.port}"
    _check_port_free(settings.host, settings.port)
    credentials = server_credentials(settings)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        raise StartupError(f"cannot serve on {address}: the port is in use or the address is not this host's") from None
    return int(port)


def _check_port_free(host: str, port: int) -> None:
    """StartupError when another process holds the port. gRPC finds out too, but reports it with a log line of its
    own (and a RuntimeError that names no cause); this says it in one line."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC reports an address it cannot resolve
    for family, kind, protocol, _, socket_address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no clash
            try:
                probe.bind(socket_address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"cannot serve on {host}:{port}: another process uses the port") from None


async def _start_metrics(endpoint: MetricsEndpoint, settings: TierSettings) -> int:
    try:
        return await endpoint.start(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise StartupError(f"cannot serve metrics on {address}: {reason}") from None


def _links(settings: TierSettings, auth_token: str) -> list[Link]:
    """A link, with its own breaker and forward timeout, to every next-tier candidate of --next and --skip-to."""
    return [
        Link(
            GrpcUpstream(
                candidate.address,
                credentials=upstream_credentials(settings),
                server_name=settings.upstream_server_name,
                auth_token=auth_token,
            ),
            breaker=CircuitBreaker(
                time.monotonic,
                failures=settings.breaker_failures,
                cooldown=settings.breaker_cooldown,
                failure_rate=settings.breaker_failure_rate,
            ),
            forward_timeout=ForwardTimeout(
                ceiling=settings.forward_timeout,
                floor=min(settings.forward_timeout_min, settings.forward_timeout),
                factor=settings.forward_timeout_factor,
            ),
            level=candidate.level,
            peer_name=candidate.name or UNKNOWN_PEER,
        )
        for candidate in settings.candidates
    ]


async def serve(settings: TierSettings) -> int:
    """Serve until SIGTERM or SIGINT (exit status 0) or until the engine fails (1: the container's or pod's
    restart policy then brings up a fresh process), shutting down gracefully either way."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = await start_tier(settings)
    # Printed (not only logged) so scripts can wait for this line.
    print(f"recserve: tier {settings.tier} ready on port {running.port}", flush=True)
    signalled = asyncio.create_task(stop.wait())
    engine_failed = asyncio.create_task(running.watch_engine(ENGINE_CHECK_SECONDS))
    await asyncio.wait((signalled, engine_failed), return_when=asyncio.FIRST_COMPLETED)
    failed = engine_failed.done()
    for task in (signalled, engine_failed):
        task.cancel()
    logger.info("tier %s shutting down (grace %.1fs)", settings.tier, settings.grace_seconds)
    await running.stop()
    return 1 if failed else 0
