"""TierService over gRPC: a thin adapter that admits calls, parses, counts bytes, calls the tier and maps errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from recserve.core.errors import InvalidRequest, Overloaded, RecServeError, Unauthenticated, Unavailable
from recserve.core.tier import Tier, sender
from recserve.core.untrusted import excerpt
from recserve.server.security import certificate_names, token_matches
from recserve.server.status import status_code
from recserve.v1 import tier_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierService"].full_name
logger = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
# Status messages travel in a header; gRPC drops a call whose headers pass its metadata limit (8-16 KiB).
MAX_STATUS_MESSAGE_CHARS = 1024


class TierServicer:
    """Handlers take and return raw bytes, so the ingress byte counts are the bytes on the wire."""

    def __init__(
        self, tier: Tier, *, max_in_flight: int = 256, auth_token: str = "", callers_by_certificate: bool = False
    ) -> None:
        """`callers_by_certificate`: callers present verified certificates (mutual TLS), so a request carrying
        hops must come from a caller whose certificate names the tier of its last hop."""
        self.tier = tier
        self.ready = False  # set once the engine has loaded
        self.max_in_flight = max_in_flight
        self._auth_token = auth_token
        self._callers_by_certificate = callers_by_certificate
        self._in_flight = 0

    async def infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def handle() -> bytes:
            request = _parse(pb.InferRequest, data)
            if request.hops and self._callers_by_certificate:
                self._check_certificate_names(request.hops[-1].tier, context)
            response = await self.tier.infer(request, context.time_remaining())
            encoded = response.SerializeToString()
            self.tier.metrics.count_bytes(sender(request), sent=len(encoded), received=len(data))
            return encoded

        return await self._guarded(handle, context)

    async def infer_stream(self, data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """InferStream: the tier's events as they come. A failure before the first event ends the call with its
        status like Infer; one after ends the stream with its status (StreamInterrupted: ABORTED)."""
        sent = 0
        request: pb.InferRequest | None = None
        try:
            with self._admitted(context.invocation_metadata()):
                request = _parse(pb.InferRequest, data)
                if request.hops and self._callers_by_certificate:
                    self._check_certificate_names(request.hops[-1].tier, context)
                events = self.tier.infer_stream(request, context.time_remaining())
                try:
                    async for event in events:
                        encoded = event.SerializeToString()
                        sent += len(encoded)
                        yield encoded
                finally:
                    await events.aclose()  # a caller that hung up cancels the generation at once
        except RecServeError as exc:
            await _abort(context, status_code(exc), str(exc))
        except Exception:
            logger.exception("unexpected error in tier %s", self.tier.name)
            await _abort(context, grpc.StatusCode.INTERNAL, f"internal error in tier {self.tier.name}; see its log")
        finally:
            if request is not None:
                # Counted on every ending, so the counters agree with the bytes the hop records show.
                self.tier.metrics.count_bytes(sender(request), sent=sent, received=len(data))

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
                reply = await handle()
        except RecServeError as exc:
            await _abort(context, status_code(exc), str(exc))
        except Exception:
            # The traceback goes to the log, never to the caller.
            logger.exception("unexpected error in tier %s", self.tier.name)
            await _abort(context, grpc.StatusCode.INTERNAL, f"internal error in tier {self.tier.name}; see its log")
        else:
            _end_quietly_past_deadline(context)
            return reply
        raise AssertionError("unreachable: context.abort raises")

    def _check_certificate_names(self, tier: str, context: grpc.aio.ServicerContext) -> None:
        if tier not in certificate_names(context.auth_context()):
            raise Unauthenticated(
                f"tier {self.tier.name} takes hops of tier {excerpt(tier)} only from a caller whose certificate "
                "names that tier"
            )

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
        message = message_type.FromString(data)
    except DecodeError:
        raise InvalidRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message") from None
    # Fields this version does not know are not carried on: a tier forwards what it understood, nothing more.
    message.DiscardUnknownFields()
    return message


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    _end_quietly_past_deadline(context)
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[:MAX_STATUS_MESSAGE_CHARS] + "..."
    await context.abort(code, message)


def _end_quietly_past_deadline(context: grpc.aio.ServicerContext) -> None:
    """Past the caller's deadline gRPC has already answered DEADLINE_EXCEEDED: a reply or status sent now fails
    inside gRPC, which logs it as an error with a traceback. Ending the handler as cancelled logs nothing."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise asyncio.CancelledError


class CallerGoneFilter(logging.Filter):
    """Log gRPC's reports of a call whose caller had gone as one-line warnings, not errors with tracebacks.

    The quiet ending above closes most of the window, not all of it. A deadline can pass between its check and the
    send of the reply, and gRPC logs the failed send as an ERROR; or it can pass before the handler's task first
    runs, and gRPC logs the task's cancellation as an ERROR. Nothing in the tier failed and the caller already has
    its status (DEADLINE_EXCEEDED or CANCELLED), so an operator's error alert must not fire on either.
    """

    UNDELIVERED = "ExecuteBatchError raised in core by servicer method"
    UNHANDLED = "Exception not handled by _handle_exceptions in servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        message = record.getMessage()
        if message.startswith(self.UNDELIVERED):
            what = "a reply of %s was not delivered"
            method = message.removeprefix(self.UNDELIVERED)
        elif message.startswith(self.UNHANDLED) and record.exc_info and record.exc_info[0] is asyncio.CancelledError:
            what = "a call of %s was cancelled before its handler ran"
            method = message.removeprefix(self.UNHANDLED)
        else:
            return True
        record.msg = what + ": its caller had gone (deadline, cancel or lost connection)"
        record.args = (method.strip(),)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


_CALLER_GONE_FILTER = CallerGoneFilter()


def add_tier_service(server: grpc.aio.Server, servicer: TierServicer) -> None:
    # The logger gRPC's asyncio server reports its calls' endings on; adding the same filter twice is a no-op.
    logging.getLogger("grpc._cython.cygrpc").addFilter(_CALLER_GONE_FILTER)
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(servicer.infer),
        "InferStream": grpc.unary_stream_rpc_method_handler(servicer.infer_stream),
        "Feedback": grpc.unary_unary_rpc_method_handler(servicer.feedback),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
