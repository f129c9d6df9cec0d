"""Hostile clients against real tiers on loopback: each test is one attack, and what the tiers do about it."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from recserve.cli import OneLineFormatter
from recserve.core.tier import OVERFLOW_FAMILY
from recserve.server.app import RunningTier, StartupError, start_tier
from recserve.server.metrics_http import MAX_CONNECTIONS
from recserve.server.processes import free_port
from recserve.server.settings import TierSettings
from recserve.tools.certs import make_certificates
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

INFER = "/recserve.v1.TierService/Infer"


def tier_settings(name: str, model: str, trace_folder: Path, **extra: object) -> TierSettings:
    return TierSettings.with_defaults(
        tier=name, host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder), trace_model=model,
        **{"plaintext": True, **extra},
    )  # fmt: skip


def quiz(qid: int, **fields: object) -> pb.InferRequest:
    return pb.InferRequest(
        prompt=f"quiz question number {qid}?", task=pb.TASK_KIND_CHOICE, options=["A", "B", "C", "D"],
        **{"family": "quiz", **fields},
    )  # fmt: skip


def label_values(registry: CollectorRegistry, sample: str, label: str) -> set[str]:
    return {s.labels[label] for family in registry.collect() for s in family.samples if s.name == sample}


def counted(registry: CollectorRegistry, sample: str, **labels: str) -> float:
    return registry.get_sample_value(sample, labels) or 0.0


def with_unknown_field(message: bytes, size: int) -> bytes:
    """`message` followed by field 1000 (length-delimited), which no version of the protocol knows, of `size` bytes."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes([*out, value])

    return message + varint(1000 << 3 | 2) + varint(size) + b"\0" * size


async def refused(call: asyncio.Future[object] | object, code: grpc.StatusCode) -> str:
    """Await a call that must fail with `code`; return its message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


@pytest.fixture
async def pair(trace_folder: Path) -> AsyncIterator[list[RunningTier]]:
    """A device that forwards everything to an edge which takes hops from it."""
    edge = await start_tier(tier_settings("edge", "medium", trace_folder, callers="device"))
    device = await start_tier(tier_settings("device", "small", trace_folder, next=edge.address, policy="forward-all"))
    yield [device, edge]
    for running in (device, edge):
        await running.stop(grace=0)


async def test_forged_hop_names_never_become_metric_labels(pair: list[RunningTier]) -> None:
    device, edge = pair
    async with grpc.aio.insecure_channel(device.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        for i in range(50):
            forged = pb.Hop(tier=f"spoof-{i:05d}-" + "x" * 1000)
            message = await refused(client.Infer(quiz(2, hops=[forged])), grpc.StatusCode.INVALID_ARGUMENT)
            assert "send no hops" in message
        assert (await client.Infer(quiz(2))).answered_by == "edge"
    async with grpc.aio.insecure_channel(edge.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        for forged in ("spoof", "x" * 20_000, "device\nforged"):
            await refused(client.Infer(quiz(3, hops=[pb.Hop(tier=forged)])), grpc.StatusCode.INVALID_ARGUMENT)
    assert label_values(device.registry, "recserve_transmitted_bytes_total", "peer") == {"client", "edge"}
    assert label_values(edge.registry, "recserve_transmitted_bytes_total", "peer") == {"device"}
    assert len(generate_latest(device.registry)) < 30_000


async def test_failed_requests_take_no_family_and_families_past_the_cap_share_a_window(trace_folder: Path) -> None:
    device = await start_tier(tier_settings("device", "small", trace_folder))
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            client = pb_grpc.TierServiceStub(channel)
            for i in range(70):
                unknown = pb.InferRequest(prompt=f"no such prompt {i}", task=pb.TASK_KIND_GENERATE, family=f"junk{i}")
                await refused(client.Infer(unknown), grpc.StatusCode.NOT_FOUND)
            assert (await client.Infer(quiz(1))).answer
            assert label_values(device.registry, "recserve_threshold", "family") == {"quiz"}
            for i in range(70):
                assert (await client.Infer(quiz(i % 30, family=f"served{i}"))).answer
        families = label_values(device.registry, "recserve_threshold", "family")
        assert len(families) == device.tier.limits.max_families + 1
        assert OVERFLOW_FAMILY in families
        # The last families served went to the shared window, each counted there.
        confidences = counted(device.registry, "recserve_confidence_count", tier="device", family=OVERFLOW_FAMILY)
        assert confidences == 70 + 1 - device.tier.limits.max_families
    finally:
        await device.stop(grace=0)


async def test_unknown_fields_and_hop_answers_are_not_carried_up(pair: list[RunningTier]) -> None:
    device, edge = pair
    raw = with_unknown_field(quiz(4).SerializeToString(), 1_000_000)
    async with grpc.aio.insecure_channel(device.address) as channel:
        reply = pb.InferResponse.FromString(await channel.unary_unary(INFER)(raw))
        assert reply.answered_by == "edge"
        received = counted(edge.registry, "recserve_transmitted_bytes_total", tier="edge", peer="device",
                           direction="received")  # fmt: skip
        assert received < 2_000
        # Bigger than any request within the limits, even compressed to a few kilobytes: refused unparsed.
        inflating = with_unknown_field(quiz(4).SerializeToString(), 3_000_000)
        await refused(
            channel.unary_unary(INFER)(inflating, compression=grpc.Compression.Gzip), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        client = pb_grpc.TierServiceStub(channel)
        answer = pb.Hop(tier="device", answer="x" * 1_000_000)
        await refused(client.Infer(quiz(5, hops=[answer])), grpc.StatusCode.INVALID_ARGUMENT)
    async with grpc.aio.insecure_channel(edge.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        long_answer = pb.Hop(tier="device", answer="x" * 100_000)
        message = await refused(client.Infer(quiz(5, hops=[long_answer])), grpc.StatusCode.INVALID_ARGUMENT)
        assert "longer than 32768" in message
    assert counted(edge.registry, "recserve_requests_total", tier="edge", outcome="answered") == 1


async def test_error_messages_quote_a_short_escaped_excerpt(pair: list[RunningTier]) -> None:
    device, edge = pair
    async with grpc.aio.insecure_channel(device.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        message = await refused(client.Infer(quiz(6, family="f" * 1_000_000)), grpc.StatusCode.INVALID_ARGUMENT)
        assert message.startswith("family 'ffff")
        assert message.endswith("(1000000 characters) must be 1-64 letters, digits, '_', '.' or '-' (e.g. 'mmlu')")
        assert len(message) < 200
        message = await refused(client.Feedback(pb.FeedbackRequest(request_id="\n" * 100)), grpc.StatusCode.NOT_FOUND)
        assert "\n" not in message
        assert len(message) < 300
    async with grpc.aio.insecure_channel(edge.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        long_name = pb.Hop(tier="d" * 20_000)
        message = await refused(client.Infer(quiz(6, hops=[long_name])), grpc.StatusCode.INVALID_ARGUMENT)
        assert len(message) < 200


async def test_a_request_id_in_use_is_refused_and_judged_once(pair: list[RunningTier]) -> None:
    device, _ = pair
    async with grpc.aio.insecure_channel(device.address) as channel:
        client = pb_grpc.TierServiceStub(channel)
        first = await client.Infer(quiz(7, request_id="mine"))
        assert first.request_id == "mine"
        message = await refused(client.Infer(quiz(8, request_id="mine")), grpc.StatusCode.INVALID_ARGUMENT)
        assert "already in use" in message
        twins = await asyncio.gather(
            *(client.Infer(quiz(9, request_id="twin")) for _ in range(3)), return_exceptions=True
        )
        assert sum(isinstance(reply, pb.InferResponse) for reply in twins) == 1
        await client.Feedback(pb.FeedbackRequest(request_id="mine", correct=True))
        await refused(client.Feedback(pb.FeedbackRequest(request_id="mine")), grpc.StatusCode.FAILED_PRECONDITION)
    _, edge = pair
    judged = label_values(edge.registry, "recserve_judged_answers_total", "verdict")
    assert judged == {"right"}
    assert counted(edge.registry, "recserve_judged_answers_total", tier="edge", family="quiz", verdict="right") == 1


async def test_no_request_writes_a_line_of_its_own_into_the_log(
    trace_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # a next tier that is down: the device logs each request it answers itself
    device = await start_tier(tier_settings("device", "small", trace_folder, next=nobody, policy="forward-all"))
    forged = "id\n2030-01-01 00:00:00,000 ERROR recserve.server.app: tier device is compromised"
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            client = pb_grpc.TierServiceStub(channel)
            with caplog.at_level(logging.WARNING):
                message = await refused(client.Infer(quiz(10, request_id=forged)), grpc.StatusCode.INVALID_ARGUMENT)
                assert "line breaks" in message
                assert (await client.Infer(quiz(10, request_id="plain"))).degraded
    finally:
        await device.stop(grace=0)
    messages = [record.getMessage() for record in caplog.records]
    assert any("plain" in message for message in messages)
    assert not any("\n" in message for message in messages)
    # And whatever a message quotes, the serve command's log format keeps each record on one line.
    record = logging.LogRecord("recserve", logging.WARNING, __file__, 1, "request %s", (forged,), None)
    assert "\n" not in OneLineFormatter("%(levelname)s %(message)s").format(record)


async def test_idle_metrics_connections_cost_no_threads_and_are_closed(trace_folder: Path) -> None:
    device = await start_tier(tier_settings("device", "small", trace_folder, metrics_port=free_port(),
                                            metrics_host="127.0.0.1"))  # fmt: skip
    threads = threading.active_count()
    idle: list[asyncio.StreamWriter] = []

    async def connect() -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", device.metrics_port)
        idle.append(writer)
        return reader

    try:
        silent = [await connect() for _ in range(100)]
        await asyncio.sleep(0.2)
        assert threading.active_count() <= threads
        # A scrape still gets through, the silent connections notwithstanding.
        reader = await connect()
        idle[-1].write(b"GET /metrics HTTP/1.1\r\nHost: tier\r\n\r\n")
        scraped = await asyncio.wait_for(reader.read(), 5)
        assert scraped.startswith(b"HTTP/1.1 200 OK")
        assert b"recserve_in_flight_requests" in scraped
        endpoint = device.metrics_endpoint
        assert endpoint is not None
        assert endpoint.open_connections <= MAX_CONNECTIONS
        # The oldest silent connections made way for newer ones; the rest are closed when their time is up.
        endpoint.timeout = 0.5
        late = [await connect() for _ in range(5)]
        for reader in [*silent[: 100 - MAX_CONNECTIONS], *late]:
            assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        for writer in idle:
            writer.close()
        await device.stop(grace=0)


async def test_tokens_from_files_in_any_case_and_between_tiers(trace_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "clients.token").write_text("client-s3cret\n")
    (tmp_path / "tiers.token").write_text("tier-s3cret\n")
    edge = await start_tier(
        tier_settings("edge", "medium", trace_folder, callers="device", auth_token_file=str(tmp_path / "tiers.token"))
    )
    device = await start_tier(
        tier_settings(
            "device",
            "small",
            trace_folder,
            next=edge.address,
            policy="forward-all",
            auth_token_file=str(tmp_path / "clients.token"),
            upstream_auth_token_file=str(tmp_path / "tiers.token"),
        )
    )
    intruder = await start_tier(
        tier_settings("device", "small", trace_folder, next=edge.address, policy="forward-all", breaker_failures=100)
    )
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            client = pb_grpc.TierServiceStub(channel)
            for scheme in ("Bearer", "bearer", "BEARER"):
                reply = await client.Infer(quiz(11), metadata=(("authorization", f"{scheme} client-s3cret"),))
                assert reply.answered_by == "edge"
            await refused(client.Infer(quiz(11)), grpc.StatusCode.UNAUTHENTICATED)
            wrong = (("authorization", "Basic client-s3cret"),)
            await refused(client.Infer(quiz(11), metadata=wrong), grpc.StatusCode.UNAUTHENTICATED)
        # Without the tiers' token, neither a client naming the device nor another tier gets through to the edge.
        async with grpc.aio.insecure_channel(edge.address) as channel:
            forged = quiz(12, hops=[pb.Hop(tier="device")])
            await refused(pb_grpc.TierServiceStub(channel).Infer(forged), grpc.StatusCode.UNAUTHENTICATED)
        async with grpc.aio.insecure_channel(intruder.address) as channel:
            assert (await pb_grpc.TierServiceStub(channel).Infer(quiz(12))).degraded
        assert counted(edge.registry, "recserve_requests_total", tier="edge", outcome="answered") == 3
    finally:
        for running in (device, intruder, edge):
            await running.stop(grace=0)


async def test_verdicts_count_only_from_callers_with_the_token(trace_folder: Path) -> None:
    device = await start_tier(tier_settings("device", "small", trace_folder, auth_token="s3cret"))
    token = (("authorization", "Bearer s3cret"),)
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            client = pb_grpc.TierServiceStub(channel)
            await refused(client.Infer(quiz(13, reference="A")), grpc.StatusCode.UNAUTHENTICATED)
            reply = await client.Infer(quiz(13), metadata=token)
            verdict = pb.FeedbackRequest(request_id=reply.request_id, correct=True)
            await refused(client.Feedback(verdict), grpc.StatusCode.UNAUTHENTICATED)
            assert label_values(device.registry, "recserve_judged_answers_total", "verdict") == set()
            await client.Feedback(verdict, metadata=token)
        assert label_values(device.registry, "recserve_judged_answers_total", "verdict") == {"right"}
    finally:
        await device.stop(grace=0)


async def test_under_mutual_tls_only_a_tier_certificate_carries_hops(trace_folder: Path, tmp_path: Path) -> None:
    make_certificates(tmp_path)
    ca = str(tmp_path / "recserve-dev-ca.pem")

    def tls(name: str) -> dict[str, str]:
        return {
            "tls_cert": str(tmp_path / f"{name}.pem"),
            "tls_key": str(tmp_path / f"{name}.key"),
            "tls_client_ca": ca,
        }

    edge = await start_tier(
        tier_settings("edge", "medium", trace_folder, callers="device", plaintext=False, **tls("edge"))
    )
    device = await start_tier(
        tier_settings(
            "device",
            "small",
            trace_folder,
            next=edge.address,
            policy="forward-all",
            plaintext=False,
            upstream_ca=ca,
            upstream_cert=str(tmp_path / "device.pem"),
            upstream_key=str(tmp_path / "device.key"),
            **tls("device"),
        )
    )
    client_credentials = grpc.ssl_channel_credentials(
        (tmp_path / "recserve-dev-ca.pem").read_bytes(),
        (tmp_path / "client.key").read_bytes(),
        (tmp_path / "client.pem").read_bytes(),
    )
    try:
        async with grpc.aio.secure_channel(device.address, client_credentials) as channel:
            assert (await pb_grpc.TierServiceStub(channel).Infer(quiz(14))).answered_by == "edge"
        async with grpc.aio.secure_channel(edge.address, client_credentials) as channel:
            client = pb_grpc.TierServiceStub(channel)
            forged = quiz(15, hops=[pb.Hop(tier="device")])
            message = await refused(client.Infer(forged), grpc.StatusCode.UNAUTHENTICATED)
            assert "certificate" in message
            assert (await client.Infer(quiz(15))).answered_by == "edge"  # as a client, it is welcome
    finally:
        for running in (device, edge):
            await running.stop(grace=0)


def test_a_port_in_use_is_one_line_at_start_up(trace_folder: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        command = [sys.executable, "-m", "recserve", "serve", "--tier", "device", "--host", "127.0.0.1", "--port",
                   str(port), "--engine", "replay", "--traces", str(trace_folder), "--trace-model", "small",
                   "--plaintext"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"recserve serve: tier device: cannot serve on 127.0.0.1:{port}: another "
                                          "process uses the port"]  # fmt: skip


async def test_a_metrics_port_in_use_is_a_startup_error(trace_folder: Path) -> None:
    port = free_port()
    taken = f"cannot serve metrics on 127.0.0.1:{port}: address already in use"
    with socket.create_server(("127.0.0.1", port)), pytest.raises(StartupError, match=taken):
        await start_tier(tier_settings("device", "small", trace_folder, metrics_port=port, metrics_host="127.0.0.1"))
