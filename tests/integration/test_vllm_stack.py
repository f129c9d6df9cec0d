"""Three tier processes: llama.cpp on the device, vLLM on edge and cloud, on the generated tiny models."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.server.processes import TierProcesses, free_port
from recserve.tools.models import make_tiny_models
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

OPTIONS = ["A", "B", "C", "D"]
# Confidences are at most 1: a fixed threshold above 1 forwards every request, so every tier runs.
ALWAYS_FORWARD = ["--policy", "fixed", "--threshold", "1.5"]


def _spawn_tier(args: list[str], log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "recserve", "serve", *args], stdout=log, stderr=subprocess.STDOUT)


async def _health_until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float) -> list[int]:
    """Every health status the tier reported while loading, up to the first SERVING."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the vLLM tier exited while loading"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)  # not listening yet
                continue
            seen.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the vLLM tier was not SERVING after {timeout:.0f}s")


async def test_llama_cpp_device_and_vllm_edge_and_cloud_answer_forward_and_score(tmp_path: Path) -> None:
    models = make_tiny_models(tmp_path / "models")
    cloud_port = free_port()
    cloud_log = (tmp_path / "cloud.log").open("wb")
    cloud = _spawn_tier(
        ["--tier", "cloud", "--host", "127.0.0.1", "--port", str(cloud_port), "--plaintext", "--callers", "edge",
         "--engine", "vllm", "--model", str(models["cloud"].hf_dir), "--context-length", "1024"],
        cloud_log,
    )  # fmt: skip
    stack = None
    try:
        statuses = await _health_until_serving(cloud_port, cloud, timeout=600)
        # The port answers while vLLM loads (tens of seconds), and says so, before it serves.
        assert statuses[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
        stack = TierProcesses(
            [
                ["--tier", "device", "--engine", "llama_cpp", "--model", str(models["device"].gguf), "--threads", "1",
                 *ALWAYS_FORWARD],
                ["--tier", "edge", "--engine", "vllm", "--model", str(models["edge"].hf_dir),
                 "--context-length", "1024", *ALWAYS_FORWARD, "--next", f"127.0.0.1:{cloud_port}"],
            ],
            tmp_path,
        )  # fmt: skip
        await asyncio.to_thread(stack.start, 600.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[0]}") as channel:
            stub = pb_grpc.TierServiceStub(channel)
            choice = pb.InferRequest(
                prompt="Which letter comes first? A) x B) y C) z D) w",
                system_prompt="Answer with A, B, C or D.",
                task=pb.TASK_KIND_CHOICE, options=OPTIONS, family="quiz",
            )  # fmt: skip
            generate = pb.InferRequest(
                prompt="What is the capital of France?", task=pb.TASK_KIND_GENERATE, family="chat",
                sampling=pb.SamplingParams(max_tokens=12),
            )  # fmt: skip
            # Concurrent requests: the vLLM tiers take them together.
            responses = await asyncio.gather(*(stub.Infer(r, timeout=300) for r in [choice, generate] * 4))
            local = await stub.Infer(
                pb.InferRequest(
                    prompt="Is water wet?",
                    task=pb.TASK_KIND_GENERATE,
                    offload=pb.OFFLOAD_MODE_LOCAL_ONLY,
                    family="chat",
                ),
                timeout=60,
            )
        for response in responses:
            assert [hop.tier for hop in response.hops] == ["device", "edge", "cloud"]
            assert response.answered_by == "cloud"
            assert [hop.decision for hop in response.hops] == [pb.DECISION_FORWARDED] * 2 + [pb.DECISION_ANSWERED]
            for hop in response.hops:
                assert 0.0 < hop.confidence <= 1.0
                assert hop.engine_seconds > 0
            assert response.hops[0].bytes_sent > 0
            assert response.confidence.value == response.hops[-1].confidence
        choices, generations = responses[0::2], responses[1::2]
        assert {r.chosen_option for r in choices} <= set(OPTIONS)
        # Greedy and deterministic: the same request gets the same answer and confidences from every tier.
        assert len({(r.answer, tuple(h.confidence for h in r.hops)) for r in choices}) == 1
        assert len({(r.answer, tuple(h.confidence for h in r.hops)) for r in generations}) == 1
        assert generations[0].usage.completion_tokens > 0
        assert generations[0].confidence.mean_logprob < 0
        assert local.answered_by == "device"
        assert [hop.tier for hop in local.hops] == ["device"]
    finally:
        codes = stack.stop() if stack is not None else []
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud_code = cloud.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cloud.kill()
            cloud_code = cloud.wait()
        cloud_log.close()
    # Graceful shutdown: SIGTERM stops the server, then the vLLM engine, and the process exits cleanly.
    assert codes == [0, 0]
    assert cloud_code == 0, (tmp_path / "cloud.log").read_text()[-3000:]
    assert "tier cloud shutting down" in (tmp_path / "cloud.log").read_text()
