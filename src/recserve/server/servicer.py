"""TierService over gRPC: a thin adapter that admits calls, parses, counts bytes, calls the tier and maps errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from recserve.core.errors import InvalidRequest, Overloaded, RecServeError, Unauthenticated, Unavailable
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
        """Run a call the tier admits; every refusal or failure ends the call here, with the status of its error."""
        try:
            with self._admitted(context.invocation_metadata()):
                return await handle()
        except RecServeError as exc:
            await context.abort(status_code(exc), str(exc))
        except Exception:
            # The traceback goes to the log, never to the caller.
            logger.exception("unexpected error in tier %s", self.tier.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in tier {self.tier.name}; see its log")
        raise AssertionError("unreachable: context.abort raises")

    @contextmanager
    def _admitted(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Iterator[None]:
        """Count a call in flight while it runs, or refuse it: engine still loading, token missing, tier full."""
        if not self.ready:
            raise Unavailable(f"tier {self.tier.name} is still loading its engine")
        if self._auth_token and not token_matches(metadata, self._auth_token):
            raise Unauthenticated(
                f"tier {self.tier.name} needs 'authorization: Bearer <token>' metadata with its token"
            )
        if self._in_flight >= self.max_in_flight:
            # Refuse at once rather than queue: a bounded tier keeps bounded memory and latency.
            self.tier.metrics.count_outcome("rejected")
            raise Overloaded(
                f"tier {self.tier.name} is serving its limit of {self.max_in_flight} requests; retry with backoff"
            )
        self._in_flight += 1
        self.tier.metrics.set_in_flight(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1
            self.tier.metrics.set_in_flight(self._in_flight)


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
