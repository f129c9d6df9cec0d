"""gRPC's reports of calls whose caller had gone: one-line warnings; every other error passes untouched."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from recserve.server.servicer import CallerGoneFilter, add_tier_service

INFER = "[/recserve.v1.TierService/Infer]"
UNDELIVERED = f"ExecuteBatchError raised in core by servicer method {INFER}"
UNHANDLED = f"Exception not handled by _handle_exceptions in servicer method {INFER}"


def _record(level: int, message: str, error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException as exc:
        info = (type(exc), exc, exc.__traceback__)
    return logging.LogRecord("grpc._cython.cygrpc", level, "server.pyx.pxi", 1, message, None, info)


@pytest.mark.parametrize(
    ("message", "error", "said"),
    [
        (UNDELIVERED, RuntimeError("failed execute_batch"), f"a reply of {INFER} was not delivered"),
        (UNHANDLED, asyncio.CancelledError(), f"a call of {INFER} was cancelled before its handler ran"),
    ],
)
def test_a_call_whose_caller_had_gone_is_a_warning_without_traceback(
    message: str, error: BaseException, said: str
) -> None:
    record = _record(logging.ERROR, message, error)
    assert CallerGoneFilter().filter(record)
    assert (record.levelno, record.levelname, record.exc_info) == (logging.WARNING, "WARNING", None)
    assert record.getMessage() == f"{said}: its caller had gone (deadline, cancel or lost connection)"


@pytest.mark.parametrize(
    ("level", "message", "error"),
    [
        (logging.ERROR, f"Unexpected [ValueError] raised by servicer method {INFER}", ValueError("bug")),
        (logging.ERROR, "Failed sending error status from server", RuntimeError("failed execute_batch")),
        # Not a cancellation: something in the handler escaped gRPC's own handling, a real error.
        (logging.ERROR, UNHANDLED, KeyError("bug")),
        (logging.WARNING, UNDELIVERED, RuntimeError("failed execute_batch")),
    ],
)
def test_every_other_record_passes_as_it_came(level: int, message: str, error: BaseException) -> None:
    record = _record(level, message, error)
    assert CallerGoneFilter().filter(record)
    assert (record.levelno, record.getMessage()) == (level, message)
    assert record.exc_info is not None


def test_the_tier_service_installs_the_filter_once(caplog: pytest.LogCaptureFixture) -> None:
    class Server:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

    async def handler(data: bytes, context: object) -> bytes:
        return data

    servicer = SimpleNamespace(infer=handler, infer_stream=handler, feedback=handler)
    cygrpc_logger = logging.getLogger("grpc._cython.cygrpc")
    before = list(cygrpc_logger.filters)
    try:
        for _ in range(2):
            add_tier_service(Server(), servicer)  # type: ignore[arg-type]
        assert sum(isinstance(f, CallerGoneFilter) for f in cygrpc_logger.filters) == 1
        with caplog.at_level(logging.INFO, logger="grpc._cython.cygrpc"):
            cygrpc_logger.error(UNDELIVERED)
        assert [r.levelname for r in caplog.records] == ["WARNING"]
    finally:
        cygrpc_logger.filters[:] = before
