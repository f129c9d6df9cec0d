"""Errors in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, and the one place where the first
tier's gRPC status codes become HTTP statuses. Imports grpc and pydantic's error type only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

RETRY_AFTER_SECONDS = "1"  # a tier refuses beyond its max in flight: by then a slot is usually free again


class GatewayError(Exception):
    """An HTTP error response; the message is meant for a person."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def from_validation(errors: Sequence[Any]) -> GatewayError:
    """A 400 from pydantic's (FastAPI's) validation errors: every problem, `field: what is wrong`, in one line."""
    problems, params = [], []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {error.get('ctx', {}).get('error', message)}"
            location = []
        problems.append(f"{'.'.join(location)}: {message}" if location else message)
        params.append(".".join(location))
    return bad_request("; ".join(problems) or "invalid request", param=params[0] if params else None)


def from_rpc(error: grpc.aio.AioRpcError, target: str, timeout: float) -> GatewayError:
    """The HTTP error for a failed call to the first tier. The tier's verdict on the request itself (invalid, an
    unknown prompt of a replay engine) is the client's fault and passes through as a 400 with its message."""
    code, details = error.code(), error.details() or error.code().name
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return bad_request(details)
    if code is grpc.StatusCode.OUT_OF_RANGE:
        return bad_request(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(
            429,
            f"the tiers are at capacity: {details}",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(
            504,
            f"no answer within the gateway's request timeout of {timeout:g} s: {details}",
            type="timeout_error",
            code="deadline_exceeded",
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return GatewayError(
            503, f"the first tier at {target} is unavailable: {details}", type="server_error", code="tier_unavailable"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The gateway's own credentials (its --token, certificate) were refused: not the client's doing.
        return GatewayError(
            502,
            f"the first tier refused the gateway's credentials: {details}",
            type="server_error",
            code="tier_refused_gateway",
        )
    return GatewayError(502, f"the first tier failed: {code.name}: {details}", type="server_error", code="tier_error")
