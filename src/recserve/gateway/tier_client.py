"""The gateway's gRPC link to the first tier: TLS, mTLS and a bearer token with the same meaning as `recserve ask`,
the request timeout sent as the gRPC deadline, and the standard health check. Imports grpc, the generated
messages and recserve.server.security."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.gateway.errors import GatewayError, from_rpc
from recserve.gateway.settings import GatewaySettings
from recserve.server.security import bearer_metadata, channel_credentials
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

HEALTH_TIMEOUT_SECONDS = 3.0
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    # A long-lived link: ping so that a dead one is noticed between requests, not at a request's deadline.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Reach a restarted first tier within a second instead of gRPC's backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class TierClient:
    """Calls the first tier; a failed call raises GatewayError with the HTTP status it means. Create it on the event
    loop that uses it."""

    def __init__(self, settings: GatewaySettings, bearer: str = "") -> None:
        """`bearer`: the token sent to the tier (read from the settings' token or file by the caller)."""
        self.target = settings.target
        self.timeout = settings.request_timeout
        self._metadata = bearer_metadata(bearer)
        options = list(CHANNEL_OPTIONS)
        if settings.server_name:
            options.append(("grpc.ssl_target_name_override", settings.server_name))
        credentials = channel_credentials(settings.ca, settings.cert, settings.key)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(settings.target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(settings.target, options=options)
        self._stub = pb_grpc.TierServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        try:
            response: pb.InferResponse = await self._stub.Infer(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        return response

    async def open_stream(self, request: pb.InferRequest) -> tuple[grpc.aio.UnaryStreamCall, pb.InferStreamResponse]:
        """Start InferStream and wait for its first event, so that a request the tiers refuse at once (invalid,
        overloaded, unreachable) still gets its HTTP status rather than an error inside a 200 stream."""
        call = self._stub.InferStream(request, timeout=self.timeout, metadata=self._metadata)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise GatewayError(
                502, "the first tier ended the stream without an answer", type="server_error", code="tier_error"
            )
        return call, first

    def error(self, exc: grpc.aio.AioRpcError) -> GatewayError:
        return from_rpc(exc, self.target, self.timeout)

    async def serving(self) -> bool:
        """Whether the first tier's health service says SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(HEALTH_TIMEOUT_SECONDS, self.timeout)
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()
