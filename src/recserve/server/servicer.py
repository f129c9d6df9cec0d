"""TierService over gRPC: a thin adapter that parses, counts bytes, calls the tier and maps errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from recserve.core.errors import InvalidRequest, RecServeError
from recserve.core.tier import Tier, sender
from recserve.server.security import token_matches
from recserve.server.status import status_code
from recserve.v1 import tier_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierService"].full_name
logger = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


class TierServicer:
    """Handlers take and return raw bytes, so the ingress byte counts are the bytes on the wire."""

    def __init__(self, tier: Tier, *, max_in_flight: int = 256, auth_token: str = "") -> None:
        self.tier = tier
        self.ready = False  # set once the engine has loaded
        self.max_in_flight = max_in_flight
        self._auth_token = auth_token
        self._in_flight = 0

    async def infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def handle() -> bytes:
            request = _parse(pb.InferRequest, data)
            response = await self.tier.infer(request, context.time_remaining())
            encoded = response.SerializeToString()
            self.tier.metrics.count_bytes(sender(request), sent=len(encoded), received=len(data))
            return encoded

        return await self._guarded(handle, context)

    async def feedback(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def handle() -> bytes:
            request = _parse(pb.FeedbackRequest, data)
            response = await self.tier.feedback(request)
            encoded = response.SerializeToString()
            # Feedback carries no hops; it comes from whoever sent this tier the request it names.
            self.tier.metrics.count_bytes(
                self.tier.sender_of(request.request_id), sent=len(encoded), received=len(data)
            )
            return encoded

        return await self._guarded(handle, context)

    async def _guarded(self, handle: Callable[[], Awaitable[bytes]], context: grpc.aio.ServicerContext) -> bytes:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"tier {self.tier.name} is still loading its engine")
        if self._auth_token and not token_matches(context.invocation_metadata(), self._auth_token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"tier {self.tier.name} needs 'authorization: Bearer <token>' metadata with its token",
            )
        if self._in_flight >= self.max_in_flight:
            # Refuse at once rather than queue: a bounded tier keeps bounded memory and latency.
            self.tier.metrics.count_outcome("rejected")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tier {self.tier.name} is serving its limit of {self.max_in_flight} requests; retry with backoff",
            )
        self._in_flight += 1
        self.tier.metrics.families.in_flight.labels(self.tier.name).set(self._in_flight)
        try:
            return await handle()
        except RecServeError as exc:
            await context.abort(status_code(exc), str(exc))
        except Exception:
            # The traceback goes to the log, never to the caller.
            logger.exception("unexpected error in tier %s", self.tier.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in tier {self.tier.name}; see its log")
        finally:
            self._in_flight -= 1
            self.tier.metrics.families.in_flight.labels(self.tier.name).set(self._in_flight)
        raise AssertionError("unreachable: context.abort raises")


def _parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message") from None


def add_tier_service(server: grpc.aio.Server, servicer: TierServicer) -> None:
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(servicer.infer),
        "Feedback": grpc.unary_unary_rpc_method_handler(servicer.feedback),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
