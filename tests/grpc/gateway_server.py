"""The gateway in the test's own event loop: uvicorn on a free loopback port (port 0), and an AsyncOpenAI client of
the official `openai` package pointed at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import openai
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from recserve.gateway.app import create_app, uvicorn_config
from recserve.gateway.settings import GatewaySettings


@dataclass
class Gateway:
    settings: GatewaySettings
    app: FastAPI
    server: uvicorn.Server
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "none", **options: Any) -> openai.AsyncOpenAI:
        """The SDK without retries, so an error status reaches the test as its typed exception at once."""
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, **options)

    @property
    def registry(self) -> CollectorRegistry:
        registry: CollectorRegistry = self.app.state.registry
        return registry


@asynccontextmanager
async def running_gateway(target: str, **overrides: Any) -> AsyncIterator[Gateway]:
    settings = GatewaySettings.with_defaults(target=target, port=0, grace_seconds=1, **overrides)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the gateway stopped before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Gateway(settings, app, server, port)
    finally:
        server.should_exit = True
        await task
