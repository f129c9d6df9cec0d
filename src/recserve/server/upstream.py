"""The gRPC link to the next tier: raw-bytes calls, so the byte counts are the bytes on the wire."""

from __future__ import annotations

import grpc

from recserve.server.status import error_from_rpc
from recserve.transport import FeedbackReply, Reply
from recserve.v1 import tier_pb2 as pb

INFER_METHOD = "/recserve.v1.TierService/Infer"
FEEDBACK_METHOD = "/recserve.v1.TierService/Feedback"

CHANNEL_OPTIONS = [
    # Tiers talk across WAN links whose NATs and load balancers drop idle flows silently: ping so a dead
    # link is noticed within a minute instead of at the next request's deadline.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Prompt size is bounded by the tier limits; 16 MiB leaves room for long generations plus hops.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class GrpcUpstream:
    """Calls the next tier's TierService; failures become domain errors (see server.status)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        # No (de)serializers: we send and receive bytes, so len() is exactly what crossed the link.
        self._infer = self._channel.unary_unary(INFER_METHOD)
        self._feedback = self._channel.unary_unary(FEEDBACK_METHOD)

    async def infer(self, request: pb.InferRequest, timeout: float | None) -> Reply:
        sent = request.SerializeToString()
        received = await self._call(self._infer, sent, timeout)
        return Reply(pb.InferResponse.FromString(received), len(sent), len(received))

    async def feedback(self, request: pb.FeedbackRequest, timeout: float | None) -> FeedbackReply:
        sent = request.SerializeToString()
        received = await self._call(self._feedback, sent, timeout)
        return FeedbackReply(pb.FeedbackResponse.FromString(received), len(sent), len(received))

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable, data: bytes, timeout: float | None) -> bytes:
        try:
            result: bytes = await method(data, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        return result

    async def close(self) -> None:
        await self._channel.close()
