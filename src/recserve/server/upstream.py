"""The gRPC link to the next tier: raw-bytes calls, so the byte counts are the bytes on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import grpc
from google.protobuf.message import DecodeError

from recserve.core.errors import UpstreamUnavailable
from recserve.core.transport import FeedbackReply, Reply, StreamEvent
from recserve.server.security import bearer_metadata
from recserve.server.status import error_from_rpc
from recserve.v1 import tier_pb2 as pb

INFER_METHOD = "/recserve.v1.TierService/Infer"
INFER_STREAM_METHOD = "/recserve.v1.TierService/InferStream"
FEEDBACK_METHOD = "/recserve.v1.TierService/Feedback"

CHANNEL_OPTIONS = [
    # Tiers talk across WAN links whose NATs and load balancers drop idle flows silently: ping so a dead
    # link is noticed within a minute instead of at the next request's deadline.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Prompt size is bounded by the tier limits; 16 MiB leaves room for long generations plus hops.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Reconnect to a restarted tier within a second (forwarding must resume within two); gRPC's default backoff
    # grows to two minutes, during which the circuit breaker's probes would all fail.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A next tier's INVALID_ARGUMENT may quote the request (older tiers quoted it whole); past gRPC's 16 KB metadata
    # limit it would arrive as a transport failure (RESOURCE_EXHAUSTED "Stream removed") and count against the next
    # tier, though the request was at fault. The next tier is one of ours; its messages stay far below this.
    ("grpc.max_metadata_size", 1024 * 1024),
    ("grpc.absolute_max_metadata_size", 1024 * 1024),
]


# Retry Infer only where it is safe: UNAVAILABLE means the next tier did not take the call (it was down or
# refused the connection); gRPC retries a stream only before its first response message. Feedback is not retried:
# a repeat would be judged twice.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "recserve.v1.TierService", "method": "Infer"},
                    {"service": "recserve.v1.TierService", "method": "InferStream"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class GrpcUpstream:
    """Calls the next tier's TierService; failures become domain errors (see server.status)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        auth_token: str = "",
    ) -> None:
        self.target = target
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", RETRY_SERVICE_CONFIG)]
        if server_name:
            # Lets tiers reach each other by address while checking the name their certificates carry.
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._metadata = bearer_metadata(auth_token)
        # No (de)serializers: we send and receive bytes, so len() is exactly what crossed the link.
        self._infer = self._channel.unary_unary(INFER_METHOD)
        self._infer_stream = self._channel.unary_stream(INFER_STREAM_METHOD)
        self._feedback = self._channel.unary_unary(FEEDBACK_METHOD)

    async def infer(self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False) -> Reply:
        sent = request.SerializeToString()
        received = await self._call(self._infer, sent, timeout, wait_for_ready)
        return Reply(pb.InferResponse.FromString(received), len(sent), len(received))

    async def infer_stream(
        self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        call = self._infer_stream(
            request.SerializeToString(), timeout=timeout, metadata=self._metadata, wait_for_ready=wait_for_ready
        )
        try:
            async for data in call:
                try:
                    message = pb.InferStreamResponse.FromString(data)
                except DecodeError:
                    raise UpstreamUnavailable(f"next tier at {self.target} sent a malformed stream event") from None
                yield StreamEvent(message, len(data))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; otherwise the next tier stops generating

    async def feedback(self, request: pb.FeedbackRequest, timeout: float | None) -> FeedbackReply:
        sent = request.SerializeToString()
        received = await self._call(self._feedback, sent, timeout)
        return FeedbackReply(pb.FeedbackResponse.FromString(received), len(sent), len(received))

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable, data: bytes, timeout: float | None, wait_for_ready: bool = False
    ) -> bytes:
        try:
            result: bytes = await method(data, timeout=timeout, metadata=self._metadata, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        return result

    async def close(self) -> None:
        await self._channel.close()
