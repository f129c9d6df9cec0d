"""TLS, mutual TLS and token authentication between real tiers on loopback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from recserve.server.app import RunningTier, start_tier
from recserve.server.settings import TierSettings
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc


def tls_settings(certs: Path, tier: str, model: str, trace_folder: Path, **extra: object) -> TierSettings:
    return TierSettings.with_defaults(
        tier=tier, host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder), trace_model=model,
        policy="forward-all", tls_cert=str(certs / f"{tier}.pem"), tls_key=str(certs / f"{tier}.key"),
        tls_client_ca=str(certs / "recserve-dev-ca.pem"), breaker_failures=100, **extra,
    )  # fmt: skip


def client_credentials(certs: Path, *, with_certificate: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "recserve-dev-ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if with_certificate else None,
        certificate_chain=(certs / "client.pem").read_bytes() if with_certificate else None,
    )


def quiz() -> pb.InferRequest:
    return pb.InferRequest(prompt="quiz question number 2?", task=pb.TASK_KIND_CHOICE, options=["A", "B", "C", "D"])


async def two_tiers(certs: Path, trace_folder: Path, upstream_ca: Path, upstream_cert: str) -> list[RunningTier]:
    cloud = await start_tier(tls_settings(certs, "cloud", "large", trace_folder, callers="device"))
    device = await start_tier(
        tls_settings(
            certs, "device", "small", trace_folder, next=cloud.address, upstream_ca=str(upstream_ca),
            upstream_cert=str(upstream_cert.replace(".key", ".pem")), upstream_key=upstream_cert,
        )
    )  # fmt: skip
    return [device, cloud]


async def test_mutual_tls_end_to_end_and_clients_without_a_certificate_are_refused(
    certs: Path, trace_folder: Path
) -> None:
    tiers = await two_tiers(certs, trace_folder, certs / "recserve-dev-ca.pem", str(certs / "device.key"))
    try:
        async with grpc.aio.secure_channel(tiers[0].address, client_credentials(certs)) as channel:
            response = await pb_grpc.TierServiceStub(channel).Infer(quiz(), timeout=10)
        assert response.answered_by == "cloud"
        assert not response.degraded
        async with grpc.aio.secure_channel(tiers[0].address, client_credentials(certs, with_certificate=False)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.TierServiceStub(ch).Infer(quiz(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(tiers[0].address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.TierServiceStub(plain).Infer(quiz(), timeout=5)
    finally:
        for running in tiers:
            await running.stop(grace=0)


@pytest.mark.parametrize("wrong", ["trusts another CA", "presents another CA's certificate"])
async def test_a_tier_with_the_wrong_ca_cannot_join(certs: Path, trace_folder: Path, wrong: str) -> None:
    if wrong == "trusts another CA":
        tiers = await two_tiers(certs, trace_folder, certs / "other" / "impostor-ca.pem", str(certs / "device.key"))
    else:
        tiers = await two_tiers(certs, trace_folder, certs / "recserve-dev-ca.pem", str(certs / "other" / "device.key"))
    try:
        async with grpc.aio.secure_channel(tiers[0].address, client_credentials(certs)) as channel:
            response = await pb_grpc.TierServiceStub(channel).Infer(quiz(), timeout=10)
        # The device still answers, itself: the cloud never accepted its connection.
        assert response.answered_by == "device"
        assert response.degraded
        assert response.hops[0].decision == pb.DECISION_DEGRADED
        cloud_requests = tiers[1].registry.get_sample_value(
            "recserve_requests_total", {"tier": "cloud", "outcome": "answered"}
        )
        assert cloud_requests is None
    finally:
        for running in tiers:
            await running.stop(grace=0)


async def test_token_authentication_on_the_client_facing_tier(trace_folder: Path) -> None:
    settings = TierSettings.with_defaults(
        tier="device", host="127.0.0.1", port=0, engine="replay", traces=str(trace_folder), trace_model="small",
        plaintext=True, auth_token="s3cret",
    )  # fmt: skip
    device = await start_tier(settings)
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = pb_grpc.TierServiceStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Infer(quiz(), metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            response = await stub.Infer(quiz(), metadata=(("authorization", "Bearer s3cret"),))
            assert response.answered_by == "device"
    finally:
        await device.stop(grace=0)


async def test_recserve_ask_speaks_mutual_tls(certs: Path, trace_folder: Path) -> None:
    tiers = await two_tiers(certs, trace_folder, certs / "recserve-dev-ca.pem", str(certs / "device.key"))
    try:
        command = [sys.executable, "-m", "recserve", "ask", "--target", tiers[0].address, "--choice", "A,B,C,D",
                   "--ca", str(certs / "recserve-dev-ca.pem"), "--cert", str(certs / "client.pem"),
                   "--key", str(certs / "client.key"), "quiz question number 2?"]  # fmt: skip
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        assert process.returncode == 0
        assert "answered by cloud" in out.decode()
        anonymous = await asyncio.create_subprocess_exec(
            *command[:-7], command[-1], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await anonymous.communicate()
        assert anonymous.returncode == 1
        assert "UNAVAILABLE" in err.decode()
    finally:
        for running in tiers:
            await running.stop(grace=0)
