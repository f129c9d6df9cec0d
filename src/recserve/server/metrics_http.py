"""The /metrics endpoint on the tier's event loop: a bounded number of connections, each with a deadline.

prometheus_client's own server (`start_http_server`) gives every connection a thread, for as long as the
connection stays open, with no timeout: idle connections pile up threads without bound. Here a connection costs a
coroutine, at most `max_connections` are open at once, and each must send its request and take the reply within
`timeout` seconds; the reply ends the connection. At the limit a new connection closes the oldest one that has
not sent its request yet, so silent connections cannot keep a scrape out.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

MAX_CONNECTIONS = 32  # Prometheus scrapes over one connection at a time; a few more for people and probes
TIMEOUT_SECONDS = 10.0  # Prometheus's default scrape timeout
MAX_REQUEST_HEAD_BYTES = 8192
METRICS_PATHS = ("/metrics", "/")


class MetricsEndpoint:
    """Serves a registry in the Prometheus text format (OpenMetrics when asked) to GET and HEAD."""

    def __init__(
        self, registry: CollectorRegistry, *, max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.timeout = timeout
        self._silent: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # no request yet, oldest first
        self._replying = 0
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        return len(self._silent) + self._replying

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port. OSError when it cannot be bound."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD_BYTES)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            if not self._silent:
                writer.transport.abort()
                return
            self._silent.popitem(last=False)[0].transport.abort()
        self._silent[writer] = None
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                if writer not in self._silent:
                    return  # closed for a newer connection while its request arrived
                del self._silent[writer]
                self._replying += 1
                try:
                    writer.write(self._reply(head))
                    writer.close()  # after the reply has gone out
                    await writer.wait_closed()
                finally:
                    self._replying -= 1
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()  # a slow, silent, broken or oversized request, or a reader that stalls
        finally:
            self._silent.pop(writer, None)
            if not writer.is_closing():
                writer.transport.abort()

    def _reply(self, head: bytes) -> bytes:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET and HEAD\n", "text/plain", allow="GET, HEAD")
        if path not in METRICS_PATHS:
            return _response("404 Not Found", b"metrics are at /metrics\n", "text/plain")
        headers = dict(_header(line) for line in header_lines if ":" in line)
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        return _response("200 OK", body, content_type, head_only=method == "HEAD")


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def _response(status: str, body: bytes, content_type: str, *, head_only: bool = False, allow: str = "") -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *([f"Allow: {allow}"] if allow else []),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
