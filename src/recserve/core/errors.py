"""Domain errors of a tier; the gRPC layer maps each to one status code in one place."""

from __future__ import annotations


class RecServeError(Exception):
    """Base of every error a tier reports to its caller; the message is meant for a person."""


class InvalidRequest(RecServeError):
    """The request cannot be served as sent; the message says what to change."""


class NotFound(RecServeError):
    """What the request names does not exist here (an unknown prompt for a replay engine, a request id)."""


class FailedPrecondition(RecServeError):
    """The request is valid but conflicts with what the tier already knows."""


class UpstreamUnavailable(RecServeError):
    """The next tier could not be reached or failed to answer."""


class UpstreamTimedOut(UpstreamUnavailable):
    """The next tier did not answer within the time this tier gave it."""


class StreamInterrupted(RecServeError):
    """An answer stream broke after part of the answer was sent: the client must not take what it got as whole."""


class DeadlineExceeded(RecServeError):
    """The caller's deadline passed before an answer was ready."""


class Unavailable(RecServeError):
    """The tier is not ready (engine still loading) or is shutting down."""


class Overloaded(RecServeError):
    """The tier already serves as many requests as it may; the caller should retry later, with backoff."""


class Unauthenticated(RecServeError):
    """The caller did not present the credentials this tier requires."""


# A next tier's verdict on the request itself reaches the caller unchanged; any other failure of the next tier (down,
# too slow, overloaded, broken) is this tier's upstream being unavailable, which it answers degraded. The gRPC link
# maps status codes by the same rule (recserve.server.status), so tiers in one process fail as tiers apart do.
VERDICTS_ON_THE_REQUEST = (InvalidRequest, NotFound, FailedPrecondition)


def as_upstream_error(error: RecServeError, peer: str) -> RecServeError:
    """What the next tier's `error` is to the tier that called it."""
    if isinstance(error, VERDICTS_ON_THE_REQUEST):
        return error
    if isinstance(error, DeadlineExceeded):
        return UpstreamTimedOut(f"next tier {peer} did not answer in time: {error}")
    return UpstreamUnavailable(f"next tier {peer} failed: {type(error).__name__}: {error}")
