"""`recserve health`: ask a tier's standard gRPC health service; the containers' HEALTHCHECK runs it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.server.settings import ENV_PREFIX


def default_target() -> str:
    """The tier in this container or shell: loopback on RECSERVE_PORT, so a HEALTHCHECK needs no arguments."""
    return f"127.0.0.1:{os.environ.get(ENV_PREFIX + 'PORT', '50051')}"


def add_health_command(commands: Any) -> None:
    """Add `health` to the `recserve` subcommands (`commands` is argparse's subparsers action)."""
    health = commands.add_parser("health", help="exit 0 if a tier's gRPC health service says SERVING")
    health.add_argument("--target", default=None, help="HOST:PORT (default: 127.0.0.1 on RECSERVE_PORT)")
    health.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")


def check_health(args: argparse.Namespace) -> int:
    """Print the status; 0 for SERVING, 1 for anything else (NOT_SERVING, unreachable, unknown service)."""
    target = args.target or default_target()
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"recserve health: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
