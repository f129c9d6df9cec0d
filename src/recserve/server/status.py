"""The one place where domain errors and gRPC status codes meet, in both directions."""

from __future__ import annotations

import grpc

from recserve.core.errors import (
    VERDICTS_ON_THE_REQUEST,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    Overloaded,
    RecServeError,
    StreamInterrupted,
    Unauthenticated,
    Unavailable,
    UpstreamTimedOut,
    UpstreamUnavailable,
)

_CODE_OF: dict[type[RecServeError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    UpstreamUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    StreamInterrupted: grpc.StatusCode.ABORTED,
}

# An upstream's verdict on the request itself passes through unchanged, any other failure is this tier's upstream
# being unavailable: the rule of recserve.core.errors.as_upstream_error, which the in-process link applies.
_ERROR_OF: dict[grpc.StatusCode, type[RecServeError]] = {_CODE_OF[kind]: kind for kind in VERDICTS_ON_THE_REQUEST}


def status_code(error: RecServeError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in _CODE_OF:
            return _CODE_OF[kind]
    return grpc.StatusCode.INTERNAL


def error_from_rpc(error: grpc.aio.AioRpcError, target: str) -> RecServeError:
    kind = _ERROR_OF.get(error.code())
    if kind is not None:
        return kind(error.details() or error.code().name)
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimedOut(f"next tier at {target} did not answer in time: {error.details()}")
    return UpstreamUnavailable(f"next tier at {target} failed: {error.code().name}: {error.details()}")
