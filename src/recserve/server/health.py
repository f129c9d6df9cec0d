"""`recserve health`: ask a tier's standard gRPC health service; the containers' HEALTHCHECK runs it.

With no arguments it checks the tier of its own container or shell, reading the variables that tier reads:
plaintext when the tier serves plaintext, TLS when RECSERVE_TLS_CERT is set (the tier then serves TLS), and
a client certificate when RECSERVE_TLS_CLIENT_CA is set (the tier then requires one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.server.settings import ENV_PREFIX


def default_target(env: Mapping[str, str]) -> str:
    """The tier in this container or shell: loopback on RECSERVE_PORT, so a HEALTHCHECK needs no arguments."""
    return f"127.0.0.1:{env.get(ENV_PREFIX + 'PORT', '50051')}"


def _from_env(env: Mapping[str, str], name: str, fallback: str = "") -> str:
    """RECSERVE_HEALTH_<NAME> when set (even empty), else `fallback`."""
    return env.get(f"{ENV_PREFIX}HEALTH_{name}", fallback)


def add_health_command(commands: Any, env: Mapping[str, str] | None = None) -> None:
    """Add `health` to the `recserve` subcommands (`commands` is argparse's subparsers action)."""
    env = os.environ if env is None else env
    own_cert = env.get(ENV_PREFIX + "TLS_CERT", "")
    client_cert, client_key = "", ""
    if ENV_PREFIX + "HEALTH_CERT" in env:
        client_cert, client_key = _from_env(env, "CERT"), _from_env(env, "KEY")
    elif env.get(ENV_PREFIX + "TLS_CLIENT_CA"):
        # A tier started with --tls-client-ca refuses callers without a certificate its CA signed; its own
        # certificate is one (`recserve certs make` gives tier certificates client use too).
        client_cert, client_key = own_cert, env.get(ENV_PREFIX + "TLS_KEY", "")
    health = commands.add_parser("health", help="exit 0 if a tier's gRPC health service says SERVING")
    health.add_argument("--target", default=default_target(env), help="HOST:PORT (default: 127.0.0.1 on RECSERVE_PORT)")
    health.add_argument("--service", default="", help="service name to check ('' is the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.add_argument(
        "--ca",
        default=_from_env(env, "CA", own_cert),
        help="PEM certificates to trust for the tier's certificate; empty: plaintext "
        "[env RECSERVE_HEALTH_CA, default: RECSERVE_TLS_CERT, the tier's own certificate, pinned]",
    )
    health.add_argument(
        "--cert",
        default=client_cert,
        help="PEM client certificate (with --ca), for a tier that requires mTLS "
        "[env RECSERVE_HEALTH_CERT, default: RECSERVE_TLS_CERT when RECSERVE_TLS_CLIENT_CA is set]",
    )
    health.add_argument(
        "--key",
        default=client_key,
        help="PEM private key for --cert [env RECSERVE_HEALTH_KEY, default: RECSERVE_TLS_KEY with RECSERVE_TLS_CERT]",
    )
    health.add_argument(
        "--server-name",
        default=_from_env(env, "SERVER_NAME"),
        help="name expected in the tier's certificate [env RECSERVE_HEALTH_SERVER_NAME, default: when --ca is a "
        "tier's own certificate, the first name it carries; else the target's host]",
    )


@dataclass(frozen=True)
class _Link:
    """How the check reaches the tier, said in the error line so a failed TLS handshake explains itself."""

    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, str], ...]
    description: str


def _link(args: argparse.Namespace) -> _Link:
    if not args.ca:
        return _Link(None, (), "plaintext")
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together")
    trusted = _read(args.ca, "--ca")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted,
        private_key=_read(args.key, "--key") if args.key else None,
        certificate_chain=_read(args.cert, "--cert") if args.cert else None,
    )
    server_name = args.server_name or pinned_name(trusted)
    # Lets the check reach its tier on loopback while verifying the name its certificate carries.
    options = (("grpc.ssl_target_name_override", server_name),) if server_name else ()
    client = f"client certificate {args.cert}" if args.cert else "no client certificate"
    expected = f", expecting {server_name!r}" if server_name else ""
    return _Link(credentials, options, f"TLS trusting {args.ca}, {client}{expected}")


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from None


def pinned_name(pem: bytes) -> str:
    """A name the first certificate of `pem` carries, when it is a server's own certificate rather than a CA's:
    trusting that very certificate, the check expects its identity whatever address reaches it. '' otherwise."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return ""  # not PEM: gRPC's handshake says what is wrong with it
    extensions = certificate.extensions
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return ""
        names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    dns_names = names.get_values_for_type(x509.DNSName)
    addresses = names.get_values_for_type(x509.IPAddress)
    return dns_names[0] if dns_names else str(addresses[0]) if addresses else ""


def check_health(args: argparse.Namespace) -> int:
    """Print the status; 0 for SERVING, 1 for anything else (NOT_SERVING, unreachable, TLS refused, unknown
    service), with one line on stderr that says why."""
    try:
        link = _link(args)
    except ValueError as exc:
        print(f"recserve health: {exc}", file=sys.stderr)
        return 1
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with _without_core_logs(), _channel(args.target, link) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(
            f"recserve health: {args.target} ({link.description}): {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _channel(target: str, link: _Link) -> grpc.Channel:
    if link.credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, link.credentials, options=link.options)


@contextmanager
def _without_core_logs() -> Iterator[None]:
    """gRPC's C core logs a failed handshake straight to file descriptor 2, in lines the RPC error's details
    repeat: silence them during the check, so that its verdict is the one line on stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
