"""TLS, mutual TLS and bearer tokens for the tiers' gRPC links, from the files the settings name."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from recserve.server.settings import TierSettings


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(settings: TierSettings) -> grpc.ServerCredentials | None:
    """TLS for callers when a certificate is given; mTLS (callers must present a certificate signed by
    --tls-client-ca) when that CA is given too. None means plaintext, which settings only allow when asked."""
    if not settings.tls_cert:
        return None
    client_ca = _read(settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS to a tier, verified against the CA bundle `ca`, presenting `cert` (with `key`) for mTLS; None without a
    CA: plaintext."""
    if not ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def upstream_credentials(settings: TierSettings) -> grpc.ChannelCredentials | None:
    """TLS to the next tier, verified against --upstream-ca, presenting --upstream-cert for mTLS."""
    return channel_credentials(settings.upstream_ca, settings.upstream_cert, settings.upstream_key)


def token(value: str, path: str) -> str:
    """A token given as such (a flag or its RECSERVE_* variable) or in a file, so that it need not show in `ps`;
    a file's surrounding whitespace (its final newline) is not part of the token."""
    if not path:
        return value
    found = Path(path).read_text().strip()
    if not found:
        raise ValueError(f"{path} holds no token")
    return found


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def token_matches(metadata: tuple[tuple[str, str | bytes], ...] | None, token: str) -> bool:
    """Whether the call carries 'authorization: Bearer <token>', the scheme in any case (RFC 7235); the token is
    compared in constant time."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            given = value if isinstance(value, bytes) else value.encode()
            scheme, _, credentials = given.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token.encode())
    return False


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> set[str]:
    """The names a caller's verified client certificate carries (its common name and subject alternative names);
    empty without mutual TLS."""
    names = [*auth_context.get("x509_common_name", ()), *auth_context.get("x509_subject_alternative_name", ())]
    return {name.decode(errors="replace") for name in names}
