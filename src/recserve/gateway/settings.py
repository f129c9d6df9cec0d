"""Typed gateway settings: every option a `recserve gateway` flag and a RECSERVE_GATEWAY_* variable, validated at
start-up. Built on the tier settings' option machinery (recserve.server.settings)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from recserve.server.settings import Option

ENV_PREFIX = "RECSERVE_GATEWAY_"
INVALID = "invalid gateway settings: "
DEFAULT_MODEL = "recserve"


def _option(name: str, kind: Any, default: Any, help: str) -> Option:
    return Option(name, kind, default, help, env_prefix=ENV_PREFIX)


OPTIONS: tuple[Option, ...] = (
    _option("target", str, "127.0.0.1:50051", "HOST:PORT of the first tier (usually the device)"),
    _option("host", str, "127.0.0.1", "address the HTTP server binds to"),
    _option("port", int, 8000, "HTTP port (0 picks a free one)"),
    _option("served_model_name", str, DEFAULT_MODEL, "the model name clients give; any other is 404"),
    _option(
        "request_timeout",
        float,
        120.0,
        "seconds a request may take, end to end; sent to the first tier as the gRPC deadline (504 past it)",
    ),
    _option("ca", str, "", "PEM CA bundle that signed the first tier's certificate (TLS; empty: plaintext)"),
    _option("cert", str, "", "PEM client certificate, for a first tier that requires mTLS (needs --ca)"),
    _option("key", str, "", "PEM private key for --cert"),
    _option("server_name", str, "", "name expected in the first tier's certificate (default: the target's host)"),
    _option(
        "token",
        str,
        "",
        "bearer token sent to the first tier, started with --auth-token (a flag shows in `ps`: prefer the "
        "variable or --token-file)",
    ),
    _option("token_file", str, "", "file holding --token (instead of it)"),
    _option(
        "api_keys",
        str,
        "",
        "comma-separated API keys clients must send as 'Authorization: Bearer KEY' on /v1 (empty, and no "
        "--api-key-file: no key needed; a flag shows in `ps`: prefer the variable or --api-key-file)",
    ),
    _option("api_key_file", str, "", "file of API keys, one a line ('#' starts a comment), instead of --api-keys"),
    _option("max_body_bytes", int, 1024 * 1024, "largest request body accepted (413 beyond)"),
    _option("grace_seconds", float, 10.0, "on SIGTERM, how long open requests and streams may finish"),
)


@dataclass(frozen=True)
class GatewaySettings:
    target: str
    host: str
    port: int
    served_model_name: str
    request_timeout: float
    ca: str
    cert: str
    key: str
    server_name: str
    token: str
    token_file: str
    api_keys: str
    api_key_file: str
    max_body_bytes: int
    grace_seconds: float

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError(INVALID + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        host, _, port = self.target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            yield f"--target must be HOST:PORT, got {self.target!r}"
        if not 0 <= self.port <= 65535:
            yield "port must be within 0-65535"
        if not self.served_model_name.strip():
            yield "served_model_name must not be empty"
        if self.request_timeout <= 0:
            yield f"request_timeout must be positive, got {self.request_timeout}"
        if self.max_body_bytes < 1024:
            yield f"max_body_bytes must be at least 1024, got {self.max_body_bytes}"
        if self.grace_seconds < 0:
            yield "grace_seconds must not be negative"
        if bool(self.cert) != bool(self.key):
            yield "--cert and --key go together"
        if (self.cert or self.server_name) and not self.ca:
            yield "--cert and --server-name need --ca"
        for name, file in (("token", "token_file"), ("api_keys", "api_key_file")):
            if getattr(self, name) and getattr(self, file):
                yield f"give {name} or {file}, not both"
        for name in ("ca", "cert", "key", "token_file", "api_key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                yield f"{name} file {path!r} does not exist"

    @classmethod
    def with_defaults(cls, **overrides: Any) -> GatewaySettings:
        """Settings from the documented defaults, ignoring the environment (for embedding and tests)."""
        unknown = overrides.keys() - {option.name for option in OPTIONS}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**({option.name: option.default for option in OPTIONS} | overrides))

    def client_api_keys(self) -> tuple[str, ...]:
        """The keys clients may send; empty: none needed. OSError or ValueError when the key file is unusable."""
        if self.api_key_file:
            lines = Path(self.api_key_file).read_text().splitlines()
            keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
            if not keys:
                raise ValueError(f"{self.api_key_file} holds no API key")
            return keys
        return tuple(key.strip() for key in self.api_keys.split(",") if key.strip())


def from_namespace(namespace: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(**{f.name: getattr(namespace, f.name) for f in fields(GatewaySettings)})
