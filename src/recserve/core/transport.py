"""How a tier reaches the next one: the Upstream interface, and an in-process link for offline replay.

Bytes are always counted from the serialized messages themselves, so the in-process link and the
gRPC link (recserve.server.upstream) report the same figures for the same traffic.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from recserve.core.errors import RecServeError, as_upstream_error
from recserve.v1 import tier_pb2 as pb


@dataclass(frozen=True)
class Reply:
    """An upstream answer and the bytes the link carried for it."""

    response: pb.InferResponse
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class StreamEvent:
    """One message of an upstream answer stream and its bytes on the link."""

    message: pb.InferStreamResponse
    size: int


@dataclass(frozen=True)
class FeedbackReply:
    response: pb.FeedbackResponse
    bytes_sent: int
    bytes_received: int


class Upstream(Protocol):
    """The next tier, as the current tier sees it."""

    async def infer(self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False) -> Reply:
        """Send `request` up; with `wait_for_ready`, wait (within `timeout`) for the link to come up."""

    def infer_stream(
        self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        """Send `request` up as a stream; `timeout` bounds the whole stream. Closing the iterator cancels the call."""

    async def feedback(self, request: pb.FeedbackRequest, timeout: float | None) -> FeedbackReply: ...

    async def close(self) -> None: ...


class InferHandler(Protocol):
    name: str

    async def infer(self, request: pb.InferRequest, timeout: float | None = None) -> pb.InferResponse: ...

    def infer_stream(
        self, request: pb.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[pb.InferStreamResponse, None]: ...

    async def feedback(self, request: pb.FeedbackRequest) -> pb.FeedbackResponse: ...


class InProcessUpstream:
    """A link to a tier object in the same process, through the same wire encoding as gRPC."""

    def __init__(self, tier: InferHandler) -> None:
        self._tier = tier

    @contextmanager
    def _failures_as_upstream_errors(self) -> Iterator[None]:
        try:
            yield
        except RecServeError as exc:
            raise as_upstream_error(exc, self._tier.name) from exc

    async def infer(self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False) -> Reply:
        sent = request.SerializeToString()
        with self._failures_as_upstream_errors():
            response = await self._tier.infer(pb.InferRequest.FromString(sent), timeout)
        received = response.SerializeToString()
        return Reply(pb.InferResponse.FromString(received), len(sent), len(received))

    async def infer_stream(
        self, request: pb.InferRequest, timeout: float | None, *, wait_for_ready: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        events = self._tier.infer_stream(pb.InferRequest.FromString(request.SerializeToString()), timeout)
        try:
            with self._failures_as_upstream_errors():
                async for event in events:
                    data = event.SerializeToString()
                    yield StreamEvent(pb.InferStreamResponse.FromString(data), len(data))
        finally:
            await events.aclose()

    async def feedback(self, request: pb.FeedbackRequest, timeout: float | None) -> FeedbackReply:
        sent = request.SerializeToString()
        with self._failures_as_upstream_errors():
            response = await self._tier.feedback(pb.FeedbackRequest.FromString(sent))
        received = response.SerializeToString()
        return FeedbackReply(pb.FeedbackResponse.FromString(received), len(sent), len(received))

    async def close(self) -> None:
        return None
