"""The containers as a user runs them: `make up` (the one command from a fresh clone: models, wheels, images,
compose) builds the three images on the local Debian base and starts the device (llama.cpp), which forwards to one
of two edges (edge: vLLM on CPU; edge-b: llama.cpp) or skips them to the cloud (vLLM on CPU) as CS-UCB placement
chooses, and the OpenAI-compatible gateway in front of the device with compose; prompts with a processing-time
requirement go from the host through the device tier's gRPC API, and chat completions through the gateway with the
official `openai` client; each tier's and the gateway's metrics (energy and requirements among them) are scraped and
queried through a Prometheus on the host; `make down` leaves nothing behind.

Prometheus and Grafana are left out of the compose run (`SERVICES=gateway` starts the tiers and the gateway alone):
their public images cannot be pulled here. Debian's `prometheus` on the host scrapes the tiers' and the gateway's
published metrics ports instead, and every dashboard query is run against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recserve.server.processes import free_port, free_ports
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.conftest import wait_serving

pytestmark = [pytest.mark.docker, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recserve.json"
LOCAL_BASE_IMAGE = "recserve-base:bookworm"
# The tiers' services (and tier names): the device, two edges, the cloud.
TIERS = ("device", "edge", "edge-b", "cloud")
# The device's candidates: both edges (RECSERVE_NEXT) and, skipping them, the cloud (RECSERVE_SKIP_TO).
CANDIDATES = ("edge", "edge-b", "cloud")
ENGINES = {"device": "llama_cpp", "edge": "vllm", "edge-b": "llama_cpp", "cloud": "vllm"}
# What `make up SERVICES=gateway` starts: the gateway and, by its depends_on, the four tiers.
SERVICES = (*TIERS, "gateway")
# One image per tier kind: edge-b runs the edge image.
IMAGES = tuple(f"recserve-{tier}:latest" for tier in ("device", "edge", "cloud"))
PROJECT = f"recserve-test-{os.getpid()}"
OPTIONS = ("A", "B", "C", "D")
# Enough questions of one family that the device's windowed threshold forwards several of them: CS-UCB tries each
# candidate once before it compares them, so the forwarded ones reach more than one candidate.
QUESTIONS = [f"Question {i}: which option is right, {', '.join(OPTIONS)}?" for i in range(40)]
# Seconds each question's answer may take: generous, so that the requirement is met whichever candidate serves.
REQUIREMENT_SECONDS = 30.0


def metrics_port_variable(tier: str) -> str:
    return f"{tier.upper().replace('-', '_')}_METRICS_PORT"


def valid_path(hops: list[str]) -> bool:
    """device, then optionally a candidate, then the cloud if that candidate was an edge."""
    if not hops or hops[0] != "device" or len(hops) > 3:
        return False
    if len(hops) >= 2 and hops[1] not in CANDIDATES:
        return False
    return len(hops) < 3 or (hops[1] != "cloud" and hops[2] == "cloud")


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def compose_commands() -> list[list[str]]:
    """Every Compose on this machine: v2 (`docker compose`) and Debian's v1 (`docker-compose`)."""
    found = []
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One tier's /metrics: sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(http_get(f"http://127.0.0.1:{port}/metrics").decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(value for found, value in samples.get(name, []) if labels.items() <= found.items())


@dataclass
class Stack:
    env: dict[str, str]
    make: list[str]
    grpc_port: int
    gateway_port: int
    metrics_ports: dict[str, int]
    up_seconds: float

    def containers(self, *, all_states: bool = True) -> list[str]:
        args = ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"]
        return run([*args, "-a"] if all_states else args).split()

    def container(self, service: str) -> str:
        (found,) = run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                        "--filter", f"label=com.docker.compose.service={service}"]).split()  # fmt: skip
        return found

    def wait_healthy(self, timeout: float) -> None:
        """Until Docker's health checks call every container healthy: the tiers' own HEALTHCHECK (`recserve health`)
        and the gateway's (its /health, 200 once the device is SERVING)."""
        deadline = time.monotonic() + timeout
        while True:
            states = [run(["docker", "inspect", "--format", "{{.State.Health.Status}}", c]).strip()
                      for c in self.containers(all_states=False)]  # fmt: skip
            if states == ["healthy"] * len(SERVICES):
                return
            assert time.monotonic() < deadline, f"containers not healthy after {timeout:.0f}s: {states}"
            time.sleep(1)

    def down(self) -> str:
        return run([*self.make, "down", "DOWN_FLAGS=--remove-orphans --volumes"], env=self.env)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.fail("no Docker daemon: run `make docker-ready` (root installs and starts it), or use `make test`")
    # Distinct ports: asked for one at a time, the kernel may hand out the same one twice, and compose fails with
    # "port is already allocated".
    names = ["DEVICE_PORT", "GATEWAY_PORT", "GRAFANA_PORT", *(metrics_port_variable(tier) for tier in TIERS)]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    # A make started by pytest started by make must not inherit the outer make's job server and flags.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    env |= {name: str(port) for name, port in ports.items()}
    make = ["make", "--no-print-directory", f"PROJECT={PROJECT}", f"BASE_IMAGE={LOCAL_BASE_IMAGE}", "SERVICES=gateway"]
    started = time.monotonic()
    stack = Stack(
        env,
        make,
        ports["DEVICE_PORT"],
        ports["GATEWAY_PORT"],
        {tier: ports[metrics_port_variable(tier)] for tier in TIERS},
        up_seconds=0.0,
    )
    try:
        # Builds what is missing (base image, wheels, images: cached after the first run), then starts the
        # tiers in order of health: cloud, then both edges, then device, then the gateway.
        run([*make, "up"], env=env, timeout=1800)
        # `up` already waited for cloud, the edges and device (the gateway starts once the device is healthy): only
        # the gateway is left.
        stack.wait_healthy(timeout=300)
        wait_serving(stack.grpc_port, timeout=10)
        stack.up_seconds = time.monotonic() - started
        yield stack
    finally:
        if stack.containers():
            for command in compose_commands()[:1]:
                logs = subprocess.run([*command, "-p", PROJECT, "-f", str(COMPOSE_FILE), "logs", "--no-color"],
                                      capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
                print(logs.stdout[-5000:])
            stack.down()


def test_the_compose_file_is_valid_for_every_compose(stack: Stack) -> None:
    commands = compose_commands()
    assert commands, "neither `docker compose` nor `docker-compose` is installed: run `make docker-ready`"
    for command in commands:
        run([*command, "-f", str(COMPOSE_FILE), "config", "-q"], env=stack.env)


def test_images_run_as_non_root_without_build_tools_and_check_their_own_health(stack: Stack) -> None:
    for image in IMAGES:
        (config,) = json.loads(run(["docker", "image", "inspect", image]))
        assert config["Config"]["User"] == "recserve:recserve"
        assert config["Config"]["Healthcheck"]["Test"] == ["CMD", "recserve", "health"]
        assert config["Config"]["Entrypoint"] == ["recserve", "serve"]
        probe = "id -u; for tool in gcc cc g++ c++ make cmake ninja; do command -v $tool || true; done"
        out = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", probe]).split()
        assert out[0] != "0"
        assert out[1:] == [], f"{image} has build tools: {out[1:]}"
    for tier in TIERS:
        health = run(["docker", "inspect", "--format", "{{.State.Health.Status}}", stack.container(tier)]).strip()
        assert health == "healthy", tier


def test_the_device_and_edge_b_run_llama_cpp_and_edge_and_cloud_run_vllm(stack: Stack) -> None:
    for tier, engine in ENGINES.items():
        container = stack.container(tier)
        env = json.loads(run(["docker", "inspect", "--format", "{{json .Config.Env}}", container]))
        assert f"RECSERVE_ENGINE={engine}" in env, (tier, env)
        # vLLM runs its engine core in a process of its own, named after it.
        processes = run(["docker", "top", container, "-eo", "pid,args"])
        assert ("EngineCore" in processes) == (engine == "vllm"), (tier, processes)


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Prometheus on the host, scraping the tiers' published metrics ports and the gateway's /metrics
    every second, in the jobs of deploy/prometheus/prometheus.yml."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run `make docker-ready`"
    folder = tmp_path_factory.mktemp("prometheus")
    targets = [f"127.0.0.1:{port}" for port in stack.metrics_ports.values()]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "recserve", "static_configs": [{"targets": targets}]},
            {"job_name": "recserve-gateway", "static_configs": [{"targets": [f"127.0.0.1:{stack.gateway_port}"]}]},
        ],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(f"{url}/-/ready")
                break
            except OSError:
                assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "prometheus not ready after 30 s"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = json.loads(http_get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def by_labels(result: list[dict[str, Any]], *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(n, "") for n in names): float(r["value"][1]) for r in result}


def wait_for(prometheus: str, expr: str, names: tuple[str, ...], expected: dict[tuple[str, ...], float]) -> None:
    deadline = time.monotonic() + 30
    while (found := by_labels(query(prometheus, expr), *names)) != expected:
        assert time.monotonic() < deadline, f"{expr}: {found} != {expected}"
        time.sleep(0.5)


def test_prompts_with_a_requirement_reach_several_candidates_and_every_metric_shows_up(
    stack: Stack, prometheus: str
) -> None:
    # Prometheus has scraped the idle stack before the traffic, so its rates cover the traffic.
    targets = {(f"127.0.0.1:{port}",): 1.0 for port in stack.metrics_ports.values()}
    wait_for(prometheus, 'up{job="recserve"}', ("instance",), targets)
    time.sleep(2)
    responses = []
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.TierServiceStub(channel)
        for index, question in enumerate(QUESTIONS):
            request = pb.InferRequest(
                request_id=f"compose-{index:03d}", prompt=question, task=pb.TASK_KIND_CHOICE, options=OPTIONS,
                family="quiz", reference=OPTIONS[index % 4], sampling=pb.SamplingParams(max_tokens=1),
                requirement_seconds=REQUIREMENT_SECONDS,
            )  # fmt: skip
            responses.append((request, stub.Infer(request, timeout=60)))
        generated = stub.Infer(
            pb.InferRequest(prompt="Say hello.", task=pb.TASK_KIND_GENERATE, sampling=pb.SamplingParams(max_tokens=8)),
            timeout=60,
        )
    assert generated.answer
    assert generated.usage.completion_tokens > 0

    answered_by = Counter(response.answered_by for _, response in responses)
    # The device's placement spread what it forwarded over its candidates: more than one of both edges and the
    # cloud (reached directly, skipping the edges) served a request.
    first_hop = Counter(response.hops[1].tier for _, response in responses if len(response.hops) > 1)
    print(f"device's candidates served {dict(first_hop)}; answered by {dict(answered_by)}")
    assert len(first_hop) > 1, first_hop
    assert set(first_hop) <= set(CANDIDATES), first_hop
    assert "device" in answered_by
    assert set(answered_by) <= set(TIERS), answered_by
    right: Counter[str] = Counter()
    link_bytes: Counter[tuple[str, str]] = Counter()  # (caller, callee) -> bytes, from the hop records
    for request, response in [*responses, (None, generated)]:
        hops = list(response.hops)
        assert valid_path([hop.tier for hop in hops]), [hop.tier for hop in hops]
        assert response.answered_by == hops[-1].tier
        for index, hop in enumerate(hops[:-1]):
            assert hop.decision == pb.DECISION_FORWARDED
            assert hop.confidence < hop.threshold
            assert hop.bytes_sent > 0
            assert hop.bytes_received > 0
            link_bytes[hop.tier, hops[index + 1].tier] += hop.bytes_sent + hop.bytes_received
        assert hops[-1].decision == pb.DECISION_ANSWERED
        assert 0.0 <= hops[-1].confidence <= 1.0
        if request is not None:
            assert response.chosen_option in OPTIONS
            right[response.answered_by] += response.chosen_option == request.reference

    scraped = {tier: scrape(port) for tier, port in stack.metrics_ports.items()}
    bytes_total = "recserve_transmitted_bytes_total"
    # Each link is counted at both ends (the caller names the callee by its candidate name, the callee the caller by
    # its hop), and both agree with the hop records the client got.
    for (caller, callee), sent_and_received in link_bytes.items():
        assert total(scraped[caller], bytes_total, peer=callee) == sent_and_received, (caller, callee)
        assert total(scraped[callee], bytes_total, peer=caller) == sent_and_received, (caller, callee)
    assert total(scraped["device"], bytes_total, peer="client", direction="received") > 0
    for tier in TIERS:
        judged = "recserve_judged_answers_total"
        assert total(scraped[tier], judged, family="quiz") == answered_by[tier]
        assert total(scraped[tier], judged, family="quiz", verdict="right") == right[tier]
    # Every question carried a requirement, met or missed at the device; the tiers above count those they served.
    requirements = "recserve_requirements_total"
    assert total(scraped["device"], requirements) == len(QUESTIONS)
    for tier in CANDIDATES:
        assert total(scraped[tier], requirements) == sum(
            tier in [hop.tier for hop in response.hops] for _, response in responses
        ), tier

    # The same numbers through Prometheus.
    expected_bytes = {("device", "client"): total(scraped["device"], bytes_total, peer="client")}
    for caller, callee in link_bytes:
        expected_bytes[caller, callee] = total(scraped[caller], bytes_total, peer=callee)
        expected_bytes[callee, caller] = total(scraped[callee], bytes_total, peer=caller)
    wait_for(prometheus, f"sum by (tier, peer) ({bytes_total})", ("tier", "peer"), expected_bytes)
    accuracy = (
        'sum by (tier) (recserve_judged_answers_total{verdict="right"}) / sum by (tier) (recserve_judged_answers_total)'
    )
    # A tier with no right answer has no verdict="right" series, so no ratio either.
    wait_for(
        prometheus, accuracy, ("tier",), {(tier,): right[tier] / answered_by[tier] for tier in right if right[tier]}
    )
    wait_for(
        prometheus, f"sum by (tier) ({requirements})", ("tier",),
        {(tier,): total(scraped[tier], requirements) for tier in TIERS if total(scraped[tier], requirements)},
    )  # fmt: skip
    # Energy: every tier that ran its engine accounted inference energy, and the device its uplink's.
    energy = "recserve_energy_joules_total"
    engines_ran = {hop.tier for _, response in responses for hop in response.hops}
    wait_for(
        prometheus, f'sum by (tier) ({energy}{{kind="inference"}})', ("tier",),
        {(tier,): total(scraped[tier], energy, kind="inference") for tier in engines_ran},
    )  # fmt: skip
    assert all(total(scraped[tier], energy, kind="inference") > 0 for tier in engines_ran)
    assert total(scraped["device"], energy, kind="transmission") > 0

    # Every dashboard query runs and returns series, over metrics that a live scrape really shows.
    time.sleep(3)  # a few scrapes after the traffic, so rates see it
    live_names = {name for samples in scraped.values() for name in samples}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            names = {word for word in live_names if word in expr}
            assert names, f"{panel['title']}: {expr} names no metric the tiers export"
            assert query(prometheus, expr), f"{panel['title']}: {expr} returned nothing"
    share = by_labels(query(prometheus, dashboard["panels"][1]["targets"][0]["expr"].replace(
        "$__rate_interval", "1m")), "tier")  # fmt: skip
    assert set(share) == {(tier,) for tier in {*answered_by, generated.answered_by}}
    assert sum(share.values()) == pytest.approx(1.0)


def served_by(extra: dict[str, Any]) -> list[str]:
    """The tiers a gateway response's `recserve` object says the request crossed, checked for consistency."""
    hops = [hop["tier"] for hop in extra["hops"]]
    assert valid_path(hops), extra
    assert extra["answered_by"] == hops[-1]
    assert [hop["decision"] for hop in extra["hops"]] == ["forwarded"] * (len(hops) - 1) + ["answered"]
    return hops


# After the gRPC test: its byte counts must see that test's traffic alone.
def test_chat_completions_through_the_gateway_with_the_openai_client(stack: Stack, prometheus: str) -> None:
    assert json.loads(http_get(f"http://127.0.0.1:{stack.gateway_port}/health")) == {"status": "ok"}
    messages: list[Any] = [{"role": "user", "content": "Say hello."}]
    last_tier = {"recserve": {"offload": "last_tier"}}
    with openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway_port}/v1", api_key="unused", timeout=60) as client:
        assert [model.id for model in client.models.list()] == ["recserve"]

        # The cascade's choice, then straight to the last tier: through the device and whichever candidate its
        # placement chose (an edge, or the cloud itself) to the cloud.
        answer = client.chat.completions.create(model="recserve", messages=messages, max_tokens=8)
        assert answer.choices[0].message.content
        assert answer.usage is not None
        assert answer.usage.completion_tokens > 0
        served_by(answer.model_extra["recserve"])  # type: ignore[index]
        cloud = client.chat.completions.create(model="recserve", messages=messages, max_tokens=8, extra_body=last_tier)
        assert cloud.choices[0].message.content
        assert served_by(cloud.model_extra["recserve"])[-1] == "cloud"  # type: ignore[index]

        # Streamed: the cloud's deltas relayed by the tiers below and the gateway as they come; who answered in the
        # last chunk.
        with client.chat.completions.create(
            model="recserve", messages=messages, max_tokens=8, stream=True, extra_body=last_tier
        ) as stream:
            chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert {chunk.model_extra["recserve"]["tier"] for chunk in chunks if chunk.choices} == {"cloud"}  # type: ignore[index]
    assert served_by(chunks[-1].model_extra["recserve"])[-1] == "cloud"  # type: ignore[index]

    # The gateway's /metrics, scraped by the host's Prometheus: its target is up and counts these requests.
    wait_for(prometheus, 'up{job="recserve-gateway"}', ("instance",), {(f"127.0.0.1:{stack.gateway_port}",): 1.0})
    wait_for(
        prometheus, 'sum by (endpoint, status) (recserve_gateway_requests_total{endpoint="/v1/chat/completions"})',
        ("endpoint", "status"), {("/v1/chat/completions", "200"): 3.0},
    )  # fmt: skip
    wait_for(prometheus, "count(recserve_gateway_time_to_first_token_seconds_count)", (), {(): 1.0})


def test_sigterm_stops_every_container_gracefully_and_down_leaves_nothing_behind(stack: Stack) -> None:
    containers = stack.containers(all_states=False)
    assert len(containers) == len(SERVICES)
    started = time.monotonic()
    run(["docker", "stop", "--time", "30", *containers])
    # Well under the 30 s after which Docker would SIGKILL: PID 1 handled SIGTERM and exited by itself.
    assert time.monotonic() - started < 25
    for container in containers:
        assert run(["docker", "inspect", "--format", "{{.State.ExitCode}}", container]).strip() == "0"
    stack.down()
    assert stack.containers() == []
    volumes = run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"])
    networks = run(["docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"])
    assert volumes.split() == networks.split() == []
    print(f"compose stack: built and up in {stack.up_seconds:.0f}s")
