"""Run a tier as a gRPC server: health, reflection, metrics endpoint and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from recserve.core.breaker import CircuitBreaker
from recserve.core.engine import Engine
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.metrics import TierMetrics
from recserve.core.tier import Tier
from recserve.engines import create_engine
from recserve.server.security import server_credentials, upstream_credentials
from recserve.server.servicer import SERVICE_NAME, TierServicer, add_tier_service
from recserve.server.settings import TierSettings
from recserve.server.upstream import GrpcUpstream

logger = logging.getLogger(__name__)

# How often a serving tier asks its engine whether it still works.
ENGINE_CHECK_SECONDS = 5.0

SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: two tiers given the same port would then share it silently, the kernel
    # splitting connections between them. A port clash must fail at start-up instead.
    ("grpc.so_reuseport", 0),
    # Tiers forward long prompts with their hop records; match the client's 16 MiB receive limit.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Accept the keepalive pings our upstream channels send every 30 s instead of answering GOAWAY.
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A lower tier keeps one long-lived connection to this one, and a Kubernetes Service balances connections,
    # not requests: ending connections after a few minutes makes callers reconnect and spread over new replicas.
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 30 * 1000),
]


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
    _metrics_server: Any = None

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
        if self.tier.upstream is not None:
            await self.tier.upstream.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


async def start_tier(
    settings: TierSettings, *, engine: Engine | None = None, registry: CollectorRegistry | None = None
) -> RunningTier:
    """Start serving: health says NOT_SERVING until the engine has loaded, then SERVING."""
    registry = registry or CollectorRegistry()
    engine = engine or create_engine(settings.engine, settings.engine_config)
    tier = Tier(
        settings.tier,
        engine,
        settings.policy.build(),
        TierMetrics.standalone(registry, settings.tier),
        _upstream(settings),
        limits=settings.limits,
        scorer=settings.scorer,
        choice_scorer_name=settings.choice_scorer,
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
        max_forwarding=settings.forward_slots,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = TierServicer(tier, max_in_flight=settings.max_in_flight, auth_token=settings.auth_token)
    add_tier_service(server, servicer)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(settings)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()

    metrics_server, metrics_port = None, 0
    if settings.metrics_port:
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
        metrics_port = metrics_server.server_port

    running = RunningTier(
        settings, tier, server, health_servicer, port, metrics_port, registry, servicer, metrics_server
    )
    try:
        await engine.start()
    except BaseException:
        await running.stop(grace=0)
        raise
    servicer.ready = True
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "tier %s serving on port %d (metrics %s, next %s, engine %s, policy %s)",
        settings.tier,
        port,
        metrics_port or "off",
        settings.next or "none",
        settings.engine,
        settings.policy.name,
    )
    return running


def _upstream(settings: TierSettings) -> GrpcUpstream | None:
    if not settings.next:
        return None
    return GrpcUpstream(
        settings.next,
        credentials=upstream_credentials(settings),
        server_name=settings.upstream_server_name,
        auth_token=settings.upstream_auth_token,
    )


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
