"""The Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize` and validates strictly
against K8S_VERSION; the rendered single-node pods then run for real with `podman kube play`, a prompt crosses
device -> edge -> cloud, and chat completions go through the gateway pod with the official `openai` client.

No cluster runs here, so podman stands in for the kubelet, with three differences the test bridges itself (the
manifests users apply stay untouched): podman does not emulate Services, so each pod runs on the host network,
bound to 127.0.0.1 on its own free ports, and RECSERVE_NEXT (RECSERVE_GATEWAY_TARGET) names the next pod's port
instead of the Service's DNS name; podman 4.3 ignores gRPC probes, so the test asks the same standard health
service itself; and podman turns HTTP and TCP probes into health checks that run curl or nc inside the container,
which the images do not carry, so the gateway's probes are dropped and the test asks its /health itself.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml

from recserve.cli import main
from recserve.server.processes import free_ports
from recserve.server.settings import parse_candidates
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.conftest import read_env_file, wait_serving, write_trace_folder

# Integration too: rendering needs kubectl and validating the k8s extra (kubernetes-validate), which
# `make test-unit` does not install.
pytestmark = [pytest.mark.k8s, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
# The Kubernetes API version the overlays are validated against (the Makefile's K8S_VERSION).
K8S_VERSION = "1.32.0"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
LOCAL_BASE_IMAGE = "recserve-base:bookworm"
TIERS = ("device", "edge", "cloud")
NEXT = {"device": "edge", "edge": "cloud"}
# The tier a tier's RECSERVE_SKIP_TO candidates run: the one after its next.
SKIP_TO = {"device": "cloud"}
GRPC_PORT = 50051
GATEWAY = "gateway"
GATEWAY_PORT = 8000
OPTIONS = ("A", "B", "C", "D")
# Enough questions of one family that the device's and the edge's windowed thresholds start forwarding.
QUESTIONS = [f"Question {i}: which option is right, {', '.join(OPTIONS)}?" for i in range(24)]

Manifest = dict[str, Any]


def run(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
    result = subprocess.run(args, cwd=ROOT, input=stdin, capture_output=True, timeout=timeout, env=env, check=False)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}:\n{result.stdout.decode()[-3000:]}\n"
        f"{result.stderr.decode()[-3000:]}"
    )
    return result.stdout.decode()


def render(folder: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(run(["kubectl", "kustomize", str(folder)])) if doc]


def by_kind(docs: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[Manifest]) -> dict[str, Manifest]:
    """Every workload: the tiers' and the gateways'."""
    return by_kind(docs, "Deployment") | by_kind(docs, "DaemonSet")


def tier_of(doc: Manifest) -> str:
    """The component a workload or Service belongs to: a tier's name, or "gateway"."""
    tier: str = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    return tier


def tier_workloads(docs: list[Manifest]) -> dict[str, Manifest]:
    return {name: doc for name, doc in workloads(docs).items() if tier_of(doc) in TIERS}


def gateways(docs: list[Manifest]) -> dict[str, Manifest]:
    return {name: doc for name, doc in workloads(docs).items() if tier_of(doc) == GATEWAY}


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def ingress_allows(policy: Manifest, source: dict[str, str], port: str | int) -> bool:
    """Whether a NetworkPolicy's ingress admits a pod of these labels (any namespace) on this port."""
    for rule in policy["spec"].get("ingress", []):
        if not any(p["port"] == port for p in rule.get("ports", [])):
            continue
        peers = rule.get("from")
        if not peers or any(selects(peer.get("podSelector", {}).get("matchLabels", {}), source) for peer in peers):
            return True
    return False


def egress_allows(policy: Manifest, target: dict[str, str], port: int) -> bool:
    for rule in policy["spec"].get("egress", []):
        if any(p["port"] == port for p in rule.get("ports", [])) and any(
            selects(peer.get("podSelector", {}).get("matchLabels", {}), target) for peer in rule.get("to", [])
        ):
            return True
    return False


def own_policy(docs: list[Manifest], workload: Manifest) -> Manifest:
    """The workload's own NetworkPolicy: the one that selects its pods by component, not the default deny."""
    (policy,) = [p for p in by_kind(docs, "NetworkPolicy").values()
                 if "app.kubernetes.io/component" in p["spec"]["podSelector"]["matchLabels"]
                 and selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(workload))]  # fmt: skip
    return policy


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def config_map_of(workload: Manifest) -> str:
    (ref,) = workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    name: str = ref["configMapRef"]["name"]
    return name


def config_of(docs: list[Manifest], workload: Manifest) -> dict[str, str]:
    data: dict[str, str] = by_kind(docs, "ConfigMap")[config_map_of(workload)]["data"]
    return data


def validate(docs: list[Manifest]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VALIDATE), "--strict", "--quiet", "-k", K8S_VERSION, "-"],
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(K8S / "overlays" / request.param)


def test_every_overlay_validates_strictly_and_a_bad_field_would_fail(overlay: tuple[str, list[Manifest]]) -> None:
    name, docs = overlay
    assert {"ServiceMonitor"} & {doc["kind"] for doc in docs} == set(), "CRDs stay out of the overlays"
    result = validate(docs)
    assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    broken = copy.deepcopy(docs)
    next(iter(workloads(broken).values()))["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert validate(broken).returncode != 0, "--strict let an unknown field through"


def test_every_tier_is_probed_locked_down_sized_and_chained_by_service_name(
    overlay: tuple[str, list[Manifest]],
) -> None:
    name, docs = overlay
    found = Counter(tier_of(doc) for doc in tier_workloads(docs).values())
    assert set(found) == set(TIERS), found
    for workload in tier_workloads(docs).values():
        tier = tier_of(workload)
        pod = workload["spec"]["template"]
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert (
                {"cpu", "memory"}
                <= container["resources"]["requests"].keys()
                <= container["resources"]["limits"].keys()
            )
        tier_container = spec["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert tier_container[probe]["grpc"] == {"port": GRPC_PORT}, (name, tier, probe)
        config = config_of(docs, workload)
        assert config["RECSERVE_TIER"] == tier
        assert config["RECSERVE_PORT"] == str(GRPC_PORT)
        # The next tier by Services of this overlay that select that tier's pods; the first candidate on the same
        # site, if any (a device may list other sites' edges after its own).
        if tier == "cloud":
            assert "RECSERVE_NEXT" not in config
            assert "RECSERVE_SKIP_TO" not in config
            continue
        assert parse_candidates(config["RECSERVE_NEXT"]), (name, tier)
        for variable, wanted in (("RECSERVE_NEXT", NEXT), ("RECSERVE_SKIP_TO", SKIP_TO)):
            for index, target in enumerate(candidate_targets(docs, config.get(variable, ""))):
                assert tier_of(target) == wanted[tier], (name, tier, variable)
                if tier == "device" and variable == "RECSERVE_NEXT" and index == 0:  # its own site's edge first
                    site = pod["metadata"]["labels"].get("recserve.io/site")
                    assert pod_labels(target).get("recserve.io/site") == site


def candidate_targets(docs: list[Manifest], text: str) -> list[Manifest]:
    """The workload behind each candidate of a RECSERVE_NEXT or RECSERVE_SKIP_TO value: a Service of this overlay, on
    one of its ports, that selects exactly one workload's pods."""
    services = by_kind(docs, "Service")
    found = []
    for _, address in parse_candidates(text):
        host, port = address.split(":")
        service = services[host]
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, address
        (target,) = [w for w in workloads(docs).values() if selects(service["spec"]["selector"], pod_labels(w))]
        found.append(target)
    return found


def test_every_forwarding_path_is_let_through_by_callers_and_network_policies(
    overlay: tuple[str, list[Manifest]],
) -> None:
    """Whatever candidate a tier's placement picks (RECSERVE_NEXT or RECSERVE_SKIP_TO), the callee takes its hops
    (RECSERVE_CALLERS names the caller's tier) and the NetworkPolicies let the call out of the caller and into the
    callee on the gRPC port."""
    name, docs = overlay
    paths = 0
    for caller in tier_workloads(docs).values():
        config = config_of(docs, caller)
        for variable in ("RECSERVE_NEXT", "RECSERVE_SKIP_TO"):
            for callee in candidate_targets(docs, config.get(variable, "")):
                paths += 1
                callers = config_of(docs, callee)["RECSERVE_CALLERS"].split(",")
                assert config["RECSERVE_TIER"] in callers, (
                    name,
                    caller["metadata"]["name"],
                    callee["metadata"]["name"],
                )
                assert egress_allows(own_policy(docs, caller), pod_labels(callee), GRPC_PORT), (name, variable)
                assert ingress_allows(own_policy(docs, callee), pod_labels(caller), "grpc"), (name, variable)
    assert paths >= 2, name


def test_edge_and_cloud_scale_and_have_disruption_budgets(overlay: tuple[str, list[Manifest]]) -> None:
    _, docs = overlay
    deployments = by_kind(docs, "Deployment")
    tiers = {name: doc for name, doc in deployments.items() if tier_of(doc) in TIERS}
    scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert scaled == set(tiers)
    assert {tier_of(doc) for doc in tiers.values()} == {"edge", "cloud"}
    assert all("replicas" not in doc["spec"] for doc in tiers.values()), "the HPA owns the replica count"
    # The gateways keep a fixed count, and a budget like the tiers'.
    assert {name: doc["spec"]["replicas"] for name, doc in gateways(docs).items()} == dict.fromkeys(gateways(docs), 2)
    budgets = by_kind(docs, "PodDisruptionBudget").values()
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, deployment["metadata"]["name"]
    policies = by_kind(docs, "NetworkPolicy").values()
    for workload in workloads(docs).values():
        own = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(workload))]
        assert len(own) == 2, "the default deny and the tier's own policy"


def test_the_gateway_fronts_the_device_locked_down_without_models(overlay: tuple[str, list[Manifest]]) -> None:
    name, docs = overlay
    assert gateways(docs), name
    services = by_kind(docs, "Service")
    devices = [w for w in tier_workloads(docs).values() if tier_of(w) == "device"]
    for gateway in gateways(docs).values():
        assert gateway["kind"] == "Deployment"
        pod = gateway["spec"]["template"]
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("initContainers"), "the gateway reads no models"
        assert "models" not in {volume["name"] for volume in spec.get("volumes", [])}
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(GATEWAY_PORT)
        (container,) = spec["containers"]
        # The device image: recserve and all its dependencies, no fourth image.
        assert container["image"] == devices[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert container["command"] == ["recserve", "gateway"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys() <= container["resources"]["limits"].keys()
        assert container["ports"] == [{"name": "http", "containerPort": GATEWAY_PORT}]
        # Ready while the device answers; alive while it accepts connections, whatever the tiers do.
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        liveness = container["livenessProbe"]
        assert liveness.get("tcpSocket") == {"port": "http"} or liveness["httpGet"]["path"] != "/health"
        assert "startupProbe" not in container or container["startupProbe"].get("httpGet", {}).get("path") != "/health"
        config = config_of(docs, gateway)
        assert config["RECSERVE_GATEWAY_PORT"] == str(GATEWAY_PORT)
        assert config["RECSERVE_GATEWAY_HOST"] == "0.0.0.0"
        # Its Service: port 8000 named http, selecting this gateway's pods.
        (service,) = [s for s in services.values() if selects(s["spec"]["selector"], pod_labels(gateway))]
        assert service["spec"]["ports"] == [
            {"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "appProtocol": "http"}
        ]
        # The target: a Service of this overlay on the gRPC port that selects device pods of the gateway's site.
        host, port = config["RECSERVE_GATEWAY_TARGET"].split(":")
        assert int(port) == GRPC_PORT
        target = services[host]
        assert GRPC_PORT in {p["port"] for p in target["spec"]["ports"]}
        behind = [w for w in workloads(docs).values() if selects(target["spec"]["selector"], pod_labels(w))]
        assert [tier_of(w) for w in behind] == ["device"], (name, host)
        site = pod_labels(gateway).get("recserve.io/site")
        assert pod_labels(behind[0]).get("recserve.io/site") == site
        if target["spec"].get("internalTrafficPolicy") == "Local":
            # The Service answers from the caller's own node only: the gateway runs where the devices run.
            assert spec["nodeSelector"] == behind[0]["spec"]["template"]["spec"]["nodeSelector"]


def test_network_policies_open_the_gateway_to_all_and_let_it_call_the_device(
    overlay: tuple[str, list[Manifest]],
) -> None:
    _, docs = overlay
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    stranger = {"app": "anything"}
    for gateway in gateways(docs).values():
        policy = own_policy(docs, gateway)
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        # Anyone may call its API, Prometheus included (/metrics is on the same port); nothing else gets in.
        assert ingress_allows(policy, stranger, "http")
        assert ingress_allows(policy, prometheus, "http")
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"http"}
        # It calls the device tier's gRPC port and DNS, and nothing else.
        for workload in tier_workloads(docs).values():
            allowed = egress_allows(policy, pod_labels(workload), GRPC_PORT)
            assert allowed == (tier_of(workload) == "device"), tier_of(workload)
        dns = {"k8s-app": "kube-dns"}
        assert egress_allows(policy, dns, 53)
        # The device's ingress lets the gateway in on the gRPC port, and no other tier does.
        for workload in tier_workloads(docs).values():
            allowed = ingress_allows(own_policy(docs, workload), pod_labels(gateway), "grpc")
            assert allowed == (tier_of(workload) == "device"), tier_of(workload)


def test_multi_tier_pins_tiers_to_labelled_nodes_and_runs_vllm_on_gpus() -> None:
    docs = render(K8S / "overlays" / "multi-tier")
    sites = set()
    for workload in tier_workloads(docs).values():
        tier = tier_of(workload)
        spec = workload["spec"]["template"]["spec"]
        assert spec["nodeSelector"]["recserve.io/tier"] == tier
        assert not spec.get("initContainers"), "real checkpoints come from the volume"
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert models["persistentVolumeClaim"]["readOnly"] is True
        config = config_of(docs, workload)
        limits = spec["containers"][0]["resources"]["limits"]
        if tier == "device":
            assert config["RECSERVE_ENGINE"] == "llama_cpp"
            assert "nvidia.com/gpu" not in limits
            sites.add(spec["nodeSelector"]["recserve.io/site"])
        else:
            assert config["RECSERVE_ENGINE"] == "vllm"
            assert config["RECSERVE_MODEL"].endswith("/hf")
            assert int(limits["nvidia.com/gpu"]) >= int(config.get("RECSERVE_TENSOR_PARALLEL_SIZE", "1"))
    assert len(sites) >= 2, "several edge sites"
    # A gateway per site, on that site's device nodes, without the GPU patches of the vLLM tiers.
    placed = {}
    for gateway in gateways(docs).values():
        spec = gateway["spec"]["template"]["spec"]
        assert spec["nodeSelector"]["recserve.io/tier"] == "device"
        placed[spec["nodeSelector"]["recserve.io/site"]] = config_of(docs, gateway)["RECSERVE_GATEWAY_TARGET"]
        assert "tolerations" not in spec
        assert [c["name"] for c in spec["containers"]] == ["gateway"]
    assert placed == {site: f"device-{site}:{GRPC_PORT}" for site in sites}


def test_multi_tier_devices_choose_between_every_sites_edge_and_the_cloud() -> None:
    """Each site's devices list their own site's edge first, then the other sites' edges, and skip to the cloud, with
    CS-UCB placement; the base overlay stays a single edge with the plain cascade."""
    docs = render(K8S / "overlays" / "multi-tier")
    edges = {pod_labels(w)["recserve.io/site"]: w for w in tier_workloads(docs).values() if tier_of(w) == "edge"}
    devices = [w for w in tier_workloads(docs).values() if tier_of(w) == "device"]
    assert len(edges) >= 2
    assert len(devices) == len(edges)
    for device in devices:
        site = pod_labels(device)["recserve.io/site"]
        config = config_of(docs, device)
        assert config["RECSERVE_PLACEMENT"] == "cs-ucb"
        reached = candidate_targets(docs, config["RECSERVE_NEXT"])
        others = sorted(w["metadata"]["name"] for other, w in edges.items() if other != site)
        assert [w["metadata"]["name"] for w in reached] == [edges[site]["metadata"]["name"], *others]
        # Named candidates: the edges share a tier name, so the names tell them apart in metrics and statistics.
        names = [candidate for candidate, _ in parse_candidates(config["RECSERVE_NEXT"])]
        assert all(names)
        assert len(set(names)) == len(names)
        (cloud,) = candidate_targets(docs, config["RECSERVE_SKIP_TO"])
        assert tier_of(cloud) == "cloud"
    base = render(K8S / "base")
    (device,) = [w for w in tier_workloads(base).values() if tier_of(w) == "device"]
    config = config_of(base, device)
    assert len(parse_candidates(config["RECSERVE_NEXT"])) == 1
    assert "RECSERVE_SKIP_TO" not in config
    assert config.get("RECSERVE_PLACEMENT", "first") == "first"
    # There the device never calls the cloud, so its NetworkPolicies keep that path closed.
    (cloud,) = [w for w in tier_workloads(base).values() if tier_of(w) == "cloud"]
    assert not egress_allows(own_policy(base, device), pod_labels(cloud), GRPC_PORT)
    assert not ingress_allows(own_policy(base, cloud), pod_labels(device), "grpc")


def test_the_service_monitor_scrapes_every_tier_and_gateway_service() -> None:
    """ServiceMonitor is a CRD kubernetes-validate has no schema for: its structure is checked here instead."""
    (monitor,) = render(K8S / "prometheus-operator")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
    for name in OVERLAYS:
        docs = render(K8S / "overlays" / name)
        namespaces = {doc["metadata"].get("namespace") for doc in workloads(docs).values()}
        assert namespaces == {monitor["metadata"]["namespace"]}
        for service in by_kind(docs, "Service").values():
            assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            # Exactly one endpoint per Service: a tier's metrics port, or the gateway's HTTP port.
            (endpoint,) = [e for e in monitor["spec"]["endpoints"] if e["port"] in ports]
            assert endpoint["path"] == "/metrics"
            pod_port = ports[endpoint["port"]]["targetPort"]
            assert pod_port == ("http" if tier_of(service) == GATEWAY else "metrics")


@pytest.mark.parametrize("name", OVERLAYS)
def test_calibrated_settings_merge_into_each_tiers_config_map(name: str, tmp_path: Path) -> None:
    """README, "A policy calibrated for a deployment": an overlay merges `recserve calibrate`'s files into the tiers'
    ConfigMaps; the tiers then read the calibrated policy, and keep the rest of their settings."""
    traces = write_trace_folder(tmp_path / "calibration", splits=("train",))
    assert main(["calibrate", "--traces", str(traces), "--chain", "small,medium,large", "--byte-budget", "0.3",
                 "--out", str(tmp_path / "policy")]) == 0  # fmt: skip
    base = render(K8S / "overlays" / name)
    # A ConfigMap per tier (and per site: multi-tier runs two), merged into by its name without the content hash.
    generators = [
        {
            "name": config_map_of(workload).rsplit("-", 1)[0],
            "behavior": "merge",
            "envs": [f"policy/{tier_of(workload)}.env"],
        }
        for workload in tier_workloads(base).values()
    ]
    # Kustomize takes a folder of resources by a relative path only.
    kustomization = {
        "resources": [os.path.relpath(K8S / "overlays" / name, tmp_path)],
        "configMapGenerator": generators,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = render(tmp_path)
    assert validate(docs).returncode == 0
    for workload_name, workload in tier_workloads(docs).items():
        config, before = config_of(docs, workload), config_of(base, tier_workloads(base)[workload_name])
        assert config == before | read_env_file(tmp_path / "policy" / f"{tier_of(workload)}.env")
        assert config["RECSERVE_POLICY"] == "budget"
        assert "quiz=" in config["RECSERVE_FAMILY_FILL_CAPS"]


# -- The pods, run for real with podman ------------------------------------------------------------------------


def podman_env(folder: Path) -> dict[str, str]:
    """Podman with a containers.conf whose ulimits stay within this machine's (raising one needs
    CAP_SYS_RESOURCE, which CI machines lack): open files at the hard limit, processes at most pid_max."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 20
    conf = folder / "containers.conf"
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n')
    return os.environ | {"CONTAINERS_CONF": str(conf)}


def load_images(env: dict[str, str]) -> None:
    """Build the tier images as the compose test does (`make images`; cached), then hand them to podman once:
    skipped when podman already holds the same image IDs; replaced ones are removed, so nothing piles up."""
    # A make started by pytest started by make must not inherit the outer make's job server and flags. -o: the
    # virtualenv running this test is the one the wheels come from; a test does not rebuild it.
    make_env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    run(["make", "--no-print-directory", "-o", ".venv/.recserve-installed", f"BASE_IMAGE={LOCAL_BASE_IMAGE}", "images"],
        env=make_env, timeout=1800)  # fmt: skip
    images = [f"recserve-{tier}:latest" for tier in TIERS]
    wanted = run(["docker", "image", "inspect", "--format", "{{.Id}}", *images]).split()
    held = []
    for image in images:
        found = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", image],
                               capture_output=True, text=True, env=env, check=False)  # fmt: skip
        held.append(found.stdout.strip() if found.returncode == 0 else "")
    if [f"sha256:{i}" for i in held] == wanted:
        return
    with subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE) as save:
        loaded = subprocess.run(["podman", "load", "-q"], stdin=save.stdout, capture_output=True, env=env, check=False)
    assert save.returncode == 0
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    stale = [i for i in held if i and f"sha256:{i}" not in wanted]
    if stale:
        subprocess.run(["podman", "rmi", *stale], capture_output=True, env=env, check=False)


def podman_pods(docs: list[Manifest], prefix: str) -> dict[str, tuple[list[Manifest], int, int]]:
    """Per tier and for the gateway, a Pod (the workload's own pod template) and its ConfigMap, rewired for podman:
    host network, 127.0.0.1 on free ports, RECSERVE_NEXT (the gateway's RECSERVE_GATEWAY_TARGET) the next pod's
    port. Returns component -> (documents, grpc or http port, metrics port)."""
    free = iter(free_ports(2 * len(TIERS) + 1))
    ports = {tier: (next(free), next(free)) for tier in TIERS}
    http_port = next(free)
    ports[GATEWAY] = (http_port, http_port)  # the gateway serves /metrics on its HTTP port
    pods: dict[str, tuple[list[Manifest], int, int]] = {}
    for workload in workloads(docs).values():
        tier = tier_of(workload)
        grpc_port, metrics_port = ports[tier]
        config = copy.deepcopy(next(c for c in by_kind(docs, "ConfigMap").values()
                                    if c["metadata"]["name"] == workload["spec"]["template"]["spec"]["containers"][0]
                                    ["envFrom"][0]["configMapRef"]["name"]))  # fmt: skip
        spec = copy.deepcopy(workload["spec"]["template"]["spec"])
        spec["hostNetwork"] = True
        spec["restartPolicy"] = "Never"
        # Podman makes an emptyDir a volume named as in the pod, so pods naming theirs alike (tmp) would share it,
        # and plays in parallel race to create it ("volume with name tmp already exists"): each gets a name of its
        # own, as each Kubernetes pod gets its own emptyDir.
        renamed = {volume["name"]: f"{prefix}-{tier}-{volume['name']}" for volume in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            volume["name"] = renamed[volume["name"]]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for mount in container.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
        if tier == GATEWAY:
            config["data"] |= {
                "RECSERVE_GATEWAY_HOST": "127.0.0.1", "RECSERVE_GATEWAY_PORT": str(http_port),
                "RECSERVE_GATEWAY_TARGET": f"127.0.0.1:{ports['device'][0]}",
            }  # fmt: skip
            spec.pop("topologySpreadConstraints", None)  # one pod, one host
        else:
            config["data"] |= {
                "RECSERVE_HOST": "127.0.0.1", "RECSERVE_PORT": str(grpc_port),
                "RECSERVE_METRICS_HOST": "127.0.0.1", "RECSERVE_METRICS_PORT": str(metrics_port),
            }  # fmt: skip
            if tier in NEXT:
                config["data"]["RECSERVE_NEXT"] = f"127.0.0.1:{ports[NEXT[tier]][0]}"
        for container in spec["containers"]:
            container.pop("ports", None)
            if tier == GATEWAY:
                # Podman would run its HTTP and TCP probes as curl and nc inside the container, which the image does
                # not carry: the fixture asks /health itself.
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    container.pop(probe, None)
                continue
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                container[probe]["grpc"]["port"] = grpc_port
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{prefix}-{tier}", "labels": pod_labels(workload)},
            "spec": spec,
        }
        pods[tier] = ([config, pod], grpc_port, metrics_port)
    return pods


def wait_healthy_http(url: str, timeout: float) -> None:
    """Until the gateway's /health answers 200 (the device behind it SERVING)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"{url} not healthy after {timeout:.0f}s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def podman_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    folder = tmp_path_factory.mktemp("podman")
    env = podman_env(folder)
    if subprocess.run(["podman", "info"], capture_output=True, env=env, check=False).returncode != 0:
        pytest.fail("podman does not work here: run `make podman-ready` (root installs it), or use `make test`")
    load_images(env)
    prefix = f"recserve-k8s-{os.getpid()}"
    pods = podman_pods(render(K8S / "overlays" / "single-node"), prefix)
    assert set(pods) == {*TIERS, GATEWAY}
    files = {}
    for tier, (documents, _, _) in pods.items():
        files[tier] = folder / f"{tier}.yaml"
        files[tier].write_text(yaml.safe_dump_all(documents))
    try:
        # In parallel: podman waits ~20 s for each init container's exit here, so one after another would add up.
        plays = {tier: subprocess.Popen(["podman", "kube", "play", str(path)], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT) for tier, path in files.items()}  # fmt: skip
        for tier, play in plays.items():
            output = play.communicate(timeout=300)[0].decode()
            assert play.returncode == 0, f"podman kube play {tier}:\n{output[-3000:]}"
        for tier in TIERS:
            wait_serving(pods[tier][1], timeout=120)
        wait_healthy_http(f"http://127.0.0.1:{pods[GATEWAY][1]}/health", timeout=60)
        yield {tier: port for tier, (_, port, _) in pods.items()}
    finally:
        for tier, (documents, _, _) in pods.items():
            container = documents[1]["spec"]["containers"][0]["name"]
            logs = subprocess.run(["podman", "logs", "--tail", "30", f"{prefix}-{tier}-{container}"],
                                  capture_output=True, text=True, env=env, check=False)  # fmt: skip
            print(f"--- {tier}\n{logs.stdout}{logs.stderr}")
        for path in files.values():
            subprocess.run(
                ["podman", "kube", "down", str(path)], capture_output=True, env=env, timeout=120, check=False
            )
        left = run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter", f"name={prefix}"], env=env).split()
        left_pods = run(["podman", "pod", "ps", "--format", "{{.Name}}", "--filter", f"name={prefix}"], env=env)
        assert left == [], f"containers left behind: {left}"
        assert left_pods.split() == [], f"pods left behind: {left_pods}"


def test_the_rendered_pods_run_and_a_prompt_crosses_all_three_tiers(podman_stack: dict[str, int]) -> None:
    answered_by: Counter[str] = Counter()
    crossed = []
    with grpc.insecure_channel(f"127.0.0.1:{podman_stack['device']}") as channel:
        stub = pb_grpc.TierServiceStub(channel)
        for index, question in enumerate(QUESTIONS):
            request = pb.InferRequest(
                request_id=f"k8s-{index:03d}", prompt=question, task=pb.TASK_KIND_CHOICE, options=OPTIONS,
                family="quiz", reference=OPTIONS[index % 4], sampling=pb.SamplingParams(max_tokens=1),
            )  # fmt: skip
            response = stub.Infer(request, timeout=60)
            answered_by[response.answered_by] += 1
            assert response.chosen_option in OPTIONS
            if response.answered_by == "cloud":
                crossed.append([hop.tier for hop in response.hops])
    assert set(answered_by) == set(TIERS), answered_by
    assert crossed
    assert all(hops == list(TIERS) for hops in crossed), crossed


def test_the_gateway_pod_serves_chat_completions_through_the_tiers(podman_stack: dict[str, int]) -> None:
    messages: list[Any] = [{"role": "user", "content": "Say hello."}]
    with openai.OpenAI(base_url=f"http://127.0.0.1:{podman_stack[GATEWAY]}/v1", api_key="unused", timeout=60) as client:
        # Straight to the last tier: through the gateway pod and all three tier pods.
        answer = client.chat.completions.create(
            model="recserve", messages=messages, max_tokens=8, extra_body={"recserve": {"offload": "last_tier"}}
        )
        # Streamed, as the cascade chooses: who answered comes in the last chunk.
        with client.chat.completions.create(model="recserve", messages=messages, max_tokens=8, stream=True) as stream:
            chunks = list(stream)
    assert answer.choices[0].message.content
    served = answer.model_extra["recserve"]  # type: ignore[index]
    assert served["answered_by"] == "cloud"
    assert [hop["tier"] for hop in served["hops"]] == list(TIERS)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    served = chunks[-1].model_extra["recserve"]  # type: ignore[index]
    assert served["answered_by"] in TIERS
    assert [hop["tier"] for hop in served["hops"]] == list(TIERS[: len(served["hops"])])
    assert served["hops"][-1]["tier"] == served["answered_by"]
