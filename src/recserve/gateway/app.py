"""The gateway's FastAPI application and its uvicorn server.

Endpoints: POST /v1/chat/completions and /v1/completions (stream or not), GET /v1/models, /health (200 when the
first tier's gRPC health says SERVING, else 503) and /metrics (Prometheus). /v1 needs an API key when the gateway has
keys configured. Every error has OpenAI's shape (see errors).

Non-streamed responses carry the `recserve` object in the body and x-recserve-* headers. A stream's headers go out
before the answering tier is known: they carry x-recserve-request-id alone (the gateway makes the id and sends it
to the tiers), and the `recserve` object comes in the last chunk before `data: [DONE]` (the usage chunk when
`stream_options.include_usage`, else the chunk with the finish reason); every content chunk names the tier its
text came from in `recserve.tier`.

A stream starts once the first tier sent its first event, so that a request refused at once still gets its HTTP
status; an error later in the stream is an SSE `data: {"error": {...}}` event followed by `data: [DONE]`. When the
client goes away, the gRPC call is cancelled, and with it the tiers' generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException

from recserve.core.metrics import GatewayMetrics
from recserve.gateway.errors import GatewayError, from_validation
from recserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, _CompletionRequest
from recserve.gateway.responses import (
    DONE,
    ChatFormat,
    CompletionFormat,
    Format,
    recserve_headers,
    recserve_object,
    sse,
)
from recserve.gateway.settings import GatewaySettings
from recserve.gateway.tier_client import TierClient
from recserve.server.security import token
from recserve.v1 import tier_pb2 as pb

logger = logging.getLogger(__name__)
T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before its response
ENDPOINTS = (CHAT, COMPLETIONS, "/v1/models", "/health", "/metrics")


def create_app(settings: GatewaySettings, registry: CollectorRegistry | None = None) -> FastAPI:
    """The gateway app; the link to the first tier opens at start-up (lifespan), on the server's event loop.
    ValueError or OSError when a key or token file cannot be used."""
    registry = registry or CollectorRegistry()
    metrics = GatewayMetrics(registry)
    api_keys = tuple(key.encode() for key in settings.client_api_keys())
    bearer = token(settings.token, settings.token_file)
    holder: dict[str, TierClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder["client"] = TierClient(settings, bearer)
        try:
            yield
        finally:
            await holder["client"].close()

    app = FastAPI(title="RecServe gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    model = settings.served_model_name
    created = int(time.time())

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; counted in the metrics and logs

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = from_validation(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = GatewayError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    def check_model(request: _CompletionRequest) -> None:
        if request.model is not None and request.model != model:
            raise GatewayError(
                404, f"The model `{request.model}` does not exist.", code="model_not_found", param="model"
            )

    async def complete(
        http: Request, request: _CompletionRequest, endpoint: str, fmt: Format, infer: pb.InferRequest
    ) -> Response:
        started = time.monotonic()
        client = holder["client"]
        request_id = infer.request_id
        if not request.stream:
            response = await _unless_disconnected(http, client.infer(infer))
            metrics.count_output_tokens(endpoint, response.usage.completion_tokens)
            return JSONResponse(fmt.response(response, request_id), headers=recserve_headers(response, request_id))
        call, first = await _unless_disconnected(http, client.open_stream(infer))
        events = _stream(client, call, first, fmt, request_id, request.include_usage, endpoint, metrics, started)
        return _CancellingStream(
            call,
            events,
            media_type="text/event-stream",
            headers={"x-recserve-request-id": request_id, "cache-control": "no-cache"},
        )

    @app.post(CHAT)
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        check_model(request)
        request_id = request.recserve.request_id or uuid.uuid4().hex
        fmt = ChatFormat(f"chatcmpl-{request_id}", int(time.time()), model, logprobs=bool(request.logprobs))
        return await complete(http, request, CHAT, fmt, request.infer_request(request_id))

    @app.post(COMPLETIONS)
    async def completions(request: CompletionRequest, http: Request) -> Response:
        check_model(request)
        request_id = request.recserve.request_id or uuid.uuid4().hex
        fmt = CompletionFormat(
            f"cmpl-{request_id}",
            int(time.time()),
            model,
            logprobs=request.logprobs is not None,
            top_logprobs=bool(request.logprobs),
        )
        return await complete(http, request, COMPLETIONS, fmt, request.infer_request(request_id))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "recserve"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        if await holder["client"].serving():
            return JSONResponse({"status": "ok"})
        error = GatewayError(
            503, f"the first tier at {settings.target} is not serving", type="server_error", code="tier_unavailable"
        )
        return JSONResponse(error.body(), status_code=503)

    @app.get("/metrics")
    async def metrics_page(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_ApiKeys, keys=api_keys)
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


class ClientDisconnected(Exception):
    """The client went away while its request was being served."""


async def _unless_disconnected(http: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or, when the client disconnects first, `work` cancelled (and with it the gRPC call, so the
    tiers abort) and ClientDisconnected. Starlette does not cancel a handler whose client went away; its body read,
    the next message a request receives is the disconnect."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task not in done:
        if not task.cancelled():
            task.exception()  # taken: whatever it was, the client is gone
        raise ClientDisconnected
    return task.result()


async def _stream(
    client: TierClient,
    call: grpc.aio.UnaryStreamCall,
    first: pb.InferStreamResponse,
    fmt: Format,
    request_id: str,
    include_usage: bool,
    endpoint: str,
    metrics: GatewayMetrics,
    started: float,
) -> AsyncIterator[str]:
    """SSE events of a stream: each delta as it comes (holding one back for the finish reason would cost a token's
    time to first token), then, as OpenAI's API does, a chunk with an empty delta and the finish reason (carrying
    the `recserve` object, without include_usage), and the usage chunk."""
    first_token: float | None = None
    event: Any = first
    try:
        while True:
            if event is grpc.aio.EOF:
                raise GatewayError(502, "the first tier ended the stream before its final message",
                                   type="server_error", code="tier_error")  # fmt: skip
            if event.WhichOneof("event") == "delta":
                if first_token is None:
                    first_token = time.monotonic() - started
                yield fmt.chunk(event.delta, None)
            else:
                final = event.final
                served = recserve_object(final, request_id)
                closing = pb.TokenDelta(tier=final.answered_by)
                yield fmt.chunk(closing, final.finish_reason or "stop", None if include_usage else served)
                if include_usage:
                    yield fmt.usage_chunk(final, served)
                tokens = final.usage.completion_tokens
                metrics.count_output_tokens(endpoint, tokens)
                metrics.observe_stream(
                    endpoint, first_token_seconds=first_token, seconds=time.monotonic() - started, tokens=tokens
                )
                break
            event = await call.read()
    except (grpc.aio.AioRpcError, GatewayError) as exc:
        error = client.error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
        logger.warning("stream %s ended by an error: %s", request_id, error.message)
        yield sse(error.body())
    finally:
        call.cancel()  # a no-op once the call has ended; otherwise the tiers stop generating
    yield DONE


class _CancellingStream(StreamingResponse):
    """A StreamingResponse that cancels its gRPC call however the response ends: Starlette stops iterating the
    events when the client disconnects, and may leave the generator suspended rather than close it."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._call = call
        self._events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._call.cancel()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _send_error(send: Send, error: GatewayError) -> None:
    body = JSONResponse(error.body()).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _CountRequests:
    """Counts every HTTP response by endpoint (a known route, else "other") and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class _ApiKeys:
    """401 on /v1 without `Authorization: Bearer KEY` of a configured key; /health and /metrics stay open (probes
    and scrapers). Every key is compared, in constant time."""

    def __init__(self, app: ASGIApp, keys: tuple[bytes, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, credentials = given.partition(b" ")
            matched = False
            for key in self.keys:
                matched |= hmac.compare_digest(credentials.strip(), key)
            if scheme.lower() != b"bearer" or not matched:
                message = "a valid API key is required: send 'Authorization: Bearer KEY'"
                await _send_error(send, GatewayError(401, message, code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """413 for a request body over `max_bytes`, by its Content-Length or as it arrives. The body is read here (it
    is small) and handed on whole; later receives go to the server, so disconnects are still seen."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = GatewayError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _send_error(send, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def uvicorn_config(app: FastAPI, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        ws="none",  # no websocket routes
        timeout_graceful_shutdown=math.ceil(settings.grace_seconds),
        log_config=None,  # the process's logging (recserve's one-line format)
    )


class _Server(uvicorn.Server):
    """uvicorn raises a SIGTERM it caught again once its graceful shutdown is done, so the process dies of the signal
    (status 143); the gateway, like the tiers, exits 0 after a graceful stop, which supervisors take as a clean one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


async def serve(settings: GatewaySettings, app: FastAPI | None = None) -> int:
    """Serve until SIGTERM or SIGINT; uvicorn stops taking connections and lets open ones finish within the
    grace period. 1 when the server could not start."""
    server = _Server(uvicorn_config(app or create_app(settings), settings))
    await server.serve()
    return 0 if server.started else 1
