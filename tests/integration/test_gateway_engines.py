"""The front door on real engines: the official `openai` client → `recserve gateway` → device (llama.cpp) → edge
(llama.cpp, serving long answers progressively) → cloud (vLLM), as processes on loopback with the generated tiny
models."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recserve.server.processes import TierProcesses, free_port, wait_http
from recserve.tools.models import make_tiny_models

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

ALWAYS_FORWARD = ["--policy", "forward-all"]
PROMPT = "Question 7: what is seven plus eight? Answer briefly."
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is seven plus eight?"}]


@dataclass
class Front:
    tiers: TierProcesses
    client: openai.OpenAI

    def metric(self, index: int, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.tiers.metrics_ports[index]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        samples = (s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)
        return sum(s.value for s in samples if labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    folder = tmp_path_factory.mktemp("gateway-engines")
    models = make_tiny_models(folder / "models")
    tiers = TierProcesses(
        [
            # The cloud's weights on the device too, so its generation is slow enough to hang up in the middle of.
            ["--tier", "device", "--engine", "llama_cpp", "--model", str(models["cloud"].gguf), "--threads", "1",
             "--context-length", "1024", *ALWAYS_FORWARD],
            ["--tier", "edge", "--engine", "llama_cpp", "--model", str(models["edge"].gguf), "--threads", "1",
             "--context-length", "1024", *ALWAYS_FORWARD, "--progressive", "on", "--progressive-point-beta", "1",
             "--progressive-ensemble-model", str(models["device"].gguf)],
            ["--tier", "cloud", "--engine", "vllm", "--model", str(models["cloud"].hf_dir), "--context-length", "1024"],
        ],
        folder,
    )  # fmt: skip
    gateway: subprocess.Popen[bytes] | None = None
    log = (folder / "gateway.log").open("wb")
    try:
        tiers.start(timeout=600.0)
        port = free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "recserve", "gateway", "--target", f"127.0.0.1:{tiers.ports[0]}",
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/health", gateway, timeout=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        yield Front(tiers, client)
        client.close()
    finally:
        code = None
        if gateway is not None:
            gateway.terminate()
            code = gateway.wait(timeout=30)
        log.close()
        tiers.stop()
        assert code in (None, 0), f"the gateway exited {code} on SIGTERM"


def test_completions_streamed_and_not_come_from_vllm_on_the_cloud(front: Front) -> None:
    whole = front.client.completions.create(model="recserve", prompt=PROMPT, max_tokens=16, temperature=0)
    served = whole.model_extra["recserve"]
    assert served["answered_by"] == "cloud"
    assert [hop["tier"] for hop in served["hops"]] == ["device", "edge", "cloud"]
    assert whole.usage.completion_tokens > 0
    stream = front.client.completions.create(
        model="recserve", prompt=PROMPT, max_tokens=16, temperature=0, stream=True, logprobs=1
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text, "greedy: the stream is the same answer, relayed through two hops"
    assert chunks[-1].model_extra["recserve"]["answered_by"] == "cloud"
    logprobs = [
        lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs
    ]
    assert logprobs
    assert all(lp <= 0 for lp in logprobs)


def test_chat_streamed_and_not_applies_each_engines_template(front: Front) -> None:
    whole = front.client.chat.completions.create(model="recserve", messages=CHAT, max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.model_extra["recserve"]["answered_by"] == "cloud"
    streamed = front.client.chat.completions.create(
        model="recserve", messages=CHAT, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    # The device answers a local-only chat itself, streaming as llama.cpp generates.
    local = front.client.chat.completions.create(
        model="recserve",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        extra_body={"recserve": {"offload": "local_only"}},
    )
    assert local.model_extra["recserve"]["answered_by"] == "device"


@pytest.mark.parametrize(
    ("tier", "offload"), [(2, "last_tier"), (0, "local_only")], ids=["vllm-cloud", "llama-cpp-device"]
)
def test_a_client_that_hangs_up_mid_stream_aborts_the_generating_engine(front: Front, tier: int, offload: str) -> None:
    before = front.metric(tier, "recserve_aborted_generations_total")
    stream = front.client.completions.create(
        model="recserve",
        prompt=PROMPT,
        max_tokens=1000,
        temperature=0,
        stream=True,
        extra_body={"recserve": {"offload": offload}},
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while front.metric(tier, "recserve_aborted_generations_total") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert front.metric(tier, "recserve_aborted_generations_total") == before + 1


def test_max_tokens_temperature_and_stop_reach_the_engine(front: Front) -> None:
    def complete(**fields: object) -> openai.types.Completion:
        return front.client.completions.create(
            model="recserve", prompt=PROMPT, extra_body={"recserve": {"offload": "last_tier"}}, **fields
        )

    whole = complete(max_tokens=16, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 8
    short = complete(max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].text)
    stop = text[4:7]
    cut = complete(max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = {complete(max_tokens=16, temperature=1.5, seed=None).choices[0].text for _ in range(3)}
    assert sampled != {text}, "a high temperature samples, greedy would repeat the same text"


def test_a_long_list_question_is_sketched_by_vllm_and_expanded_point_by_point_by_llama_cpp(front: Front) -> None:
    """Progressive inference on real engines: vLLM writes the sketch under the grammar (xgrammar on CPU), llama.cpp
    expands its points, a second llama.cpp model on the edge writes again those it is unsure of (here all of them),
    vLLM repairs those the second is unsure of too, and the gateway streams them one delta a point, in order."""
    messages = [{"role": "user", "content": "What are the most effective ways to deal with stress?"}]
    stream = front.client.chat.completions.create(
        model="recserve", messages=messages, max_tokens=240, temperature=0, stream=True
    )
    deltas: list[str] = []
    served: dict[str, Any] = {}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        served = (chunk.model_extra or {}).get("recserve") or served
    assert [hop["tier"] for hop in served["hops"][:3]] == ["device", "edge", "cloud"]
    edge = served["hops"][1]
    assert edge["decision"] == "progressive"
    assert served["answered_by"] == "edge"
    progressive = edge["progressive"]
    points = progressive["points"]
    assert 2 <= len(points) <= 240 // 40  # the scheduler's cap: 40 tokens a point
    assert progressive["sketched_by"] == "cloud"
    assert progressive["sketch_tokens"] > 0
    assert len(progressive["expansions"]) == len(deltas) == len(points)
    for number, (delta, point) in enumerate(zip(deltas, points, strict=True), start=1):
        assert delta.lstrip("\n").startswith(f"{number}. **{point}**")
    expansions = progressive["expansions"]
    # --progressive-point-beta 1: every point is below the point threshold, so the edge's second model (the device's
    # weights, on llama.cpp too) writes each one again, cannot clear the threshold either, and vLLM repairs it. (Which
    # of the two a point keeps is for the unit tests; here, that the second model runs on a real engine.)
    assert all(e["ensemble_confidence"] is not None and 0.0 <= e["ensemble_confidence"] <= 1.0 for e in expansions)
    assert all(e["repaired_by"] == "cloud" and not e["ensemble_kept"] for e in expansions)
    assert front.metric(1, "recserve_progressive_requests_total", path="progressive", outcome="served") == 1
    assert front.metric(1, "recserve_progressive_points_total", outcome="repaired") == len(points)
    assert front.metric(1, "recserve_progressive_points_total", outcome="ensemble") == 0
    assert front.metric(2, "recserve_sketches_total", outcome="parsed") == 1
