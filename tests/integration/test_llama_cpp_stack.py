"""Three `recserve serve` processes with llama.cpp on generated tiny models; metrics scraped over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from recserve.server.processes import TierProcesses
from recserve.tools.models import make_tiny_models
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

NAMES = ("device", "edge", "cloud")
PROMPTS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Which number is larger, 3 or 5?",
    "Say something about the weather.",
    "What do bees make?",
    "Is water wet?",
    "Count from one to three.",
    "Which animal barks?",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_tiny_models(folder)
    return folder


def llama_stack(model_dir: Path, log_dir: Path, policies: list[list[str]]) -> TierProcesses:
    args = [
        ["--tier", tier, "--engine", "llama_cpp", "--model", str(model_dir / tier / "model.gguf"), "--threads", "1",
         *policy]
        for tier, policy in zip(NAMES, policies, strict=True)
    ]  # fmt: skip
    return TierProcesses(args, log_dir)


@pytest.fixture
def forwarding_stack(model_dir: Path, tmp_path: Path) -> Iterator[TierProcesses]:
    # Confidences are at most 1, so a fixed threshold above 1 forwards every request: all three tiers run.
    always = ["--policy", "fixed", "--threshold", "1.5"]
    stack = llama_stack(model_dir, tmp_path, [always, always, ["--policy", "recserve"]])
    stack.start()
    yield stack
    assert stack.stop() == [0, 0, 0]


async def test_a_prompt_crosses_all_three_tiers_and_metrics_count_its_bytes(forwarding_stack: TierProcesses) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{forwarding_stack.ports[0]}") as channel:
        stub = pb_grpc.TierServiceStub(channel)
        choice = await stub.Infer(
            pb.InferRequest(prompt=PROMPTS[0], task=pb.TASK_KIND_CHOICE, options=["A", "B", "C", "D"], family="quiz"),
            timeout=60,
        )
        generated = await stub.Infer(
            pb.InferRequest(prompt=PROMPTS[1], task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=8)),
            timeout=60,
        )
    for response in (choice, generated):
        assert [hop.tier for hop in response.hops] == list(NAMES)
        assert response.answered_by == "cloud"
        for hop in response.hops:
            assert 0.0 <= hop.confidence <= 1.0
            assert hop.engine_seconds > 0
    assert choice.chosen_option in {"A", "B", "C", "D"}
    assert generated.usage.completion_tokens > 0
    assert generated.confidence.mean_logprob < 0

    hop_bytes = [sum(r.hops[i].bytes_sent + r.hops[i].bytes_received for r in (choice, generated)) for i in (0, 1)]
    scraped = [forwarding_stack.scrape_bytes(i) for i in range(3)]
    device_to_edge = scraped[0][("edge", "sent")] + scraped[0][("edge", "received")]
    edge_from_device = scraped[1][("device", "sent")] + scraped[1][("device", "received")]
    edge_to_cloud = scraped[1][("cloud", "sent")] + scraped[1][("cloud", "received")]
    assert device_to_edge == edge_from_device == hop_bytes[0]
    assert edge_to_cloud == hop_bytes[1]
    assert scraped[0][("client", "received")] > 0


async def test_recserve_policy_forwards_below_its_threshold(model_dir: Path, tmp_path: Path) -> None:
    recserve = ["--policy", "recserve", "--beta", "0.5"]
    stack = llama_stack(model_dir, tmp_path, [recserve, recserve, recserve])
    stack.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[0]}") as channel:
            stub = pb_grpc.TierServiceStub(channel)
            forwarded = 0
            for prompt in PROMPTS:
                request = pb.InferRequest(
                    prompt=prompt, task=pb.TASK_KIND_CHOICE, options=["A", "B", "C", "D"], family="quiz"
                )
                response = await stub.Infer(request, timeout=60)
                for hop in response.hops[:-1]:
                    assert hop.decision == pb.DECISION_FORWARDED
                    assert hop.confidence < hop.threshold
                assert response.hops[-1].decision == pb.DECISION_ANSWERED
                forwarded += len(response.hops) > 1
        assert forwarded > 0
    finally:
        assert stack.stop() == [0, 0, 0]
