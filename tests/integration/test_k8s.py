"""The Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize` and validates strictly
against K8S_VERSION; the rendered single-node pods then run for real with `podman kube play` and a prompt crosses
device -> edge -> cloud.

No cluster runs here, so podman stands in for the kubelet, with two differences the test bridges itself (the
manifests users apply stay untouched): podman does not emulate Services, so each pod runs on the host network,
bound to 127.0.0.1 on its own free ports, and RECSERVE_NEXT names the next pod's port instead of the Service's
DNS name; and podman 4.3 ignores gRPC probes, so the test asks the same standard health service itself.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from recserve.server.processes import free_ports
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.conftest import wait_serving

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
GRPC_PORT = 50051
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
    return by_kind(docs, "Deployment") | by_kind(docs, "DaemonSet")


def tier_of(doc: Manifest) -> str:
    tier: str = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    return tier


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def config_of(docs: list[Manifest], workload: Manifest) -> dict[str, str]:
    (ref,) = workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    data: dict[str, str] = by_kind(docs, "ConfigMap")[ref["configMapRef"]["name"]]["data"]
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
    services = by_kind(docs, "Service")
    found = Counter(tier_of(doc) for doc in workloads(docs).values())
    assert set(found) == set(TIERS), found
    for workload in workloads(docs).values():
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
        # The next tier by a Service of this overlay that selects that tier's pods (same site, if any).
        if tier == "cloud":
            assert "RECSERVE_NEXT" not in config
            continue
        host, port = config["RECSERVE_NEXT"].split(":")
        service = services[host]
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        selector = service["spec"]["selector"]
        targets = [
            w for w in workloads(docs).values() if selects(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert [tier_of(w) for w in targets] == [NEXT[tier]], (name, tier, host)
        if tier == "device":  # a device calls its own site's edge; every site shares the cloud
            site = pod["metadata"]["labels"].get("recserve.io/site")
            assert targets[0]["spec"]["template"]["metadata"]["labels"].get("recserve.io/site") == site


def test_edge_and_cloud_scale_and_have_disruption_budgets(overlay: tuple[str, list[Manifest]]) -> None:
    _, docs = overlay
    deployments = by_kind(docs, "Deployment")
    scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert scaled == set(deployments)
    assert {tier_of(doc) for doc in deployments.values()} == {"edge", "cloud"}
    assert all("replicas" not in doc["spec"] for doc in deployments.values()), "the HPA owns the replica count"
    budgets = by_kind(docs, "PodDisruptionBudget").values()
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, deployment["metadata"]["name"]
    policies = by_kind(docs, "NetworkPolicy").values()
    for workload in workloads(docs).values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        own = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert len(own) == 2, "the default deny and the tier's own policy"


def test_multi_tier_pins_tiers_to_labelled_nodes_and_runs_vllm_on_gpus() -> None:
    docs = render(K8S / "overlays" / "multi-tier")
    sites = set()
    for workload in workloads(docs).values():
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


def test_the_service_monitor_scrapes_every_tier_service() -> None:
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
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports
                pod_port = ports[endpoint["port"]]["targetPort"]
                assert pod_port == "metrics"


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
    """Per tier, a Pod (the workload's own pod template) and its ConfigMap, rewired for podman: host network,
    127.0.0.1 on free ports, RECSERVE_NEXT the next pod's port. Returns tier -> (documents, grpc, metrics)."""
    free = iter(free_ports(2 * len(TIERS)))
    ports = {tier: (next(free), next(free)) for tier in TIERS}
    pods: dict[str, tuple[list[Manifest], int, int]] = {}
    for workload in workloads(docs).values():
        tier = tier_of(workload)
        grpc_port, metrics_port = ports[tier]
        config = copy.deepcopy(next(c for c in by_kind(docs, "ConfigMap").values()
                                    if c["metadata"]["name"] == workload["spec"]["template"]["spec"]["containers"][0]
                                    ["envFrom"][0]["configMapRef"]["name"]))  # fmt: skip
        config["data"] |= {
            "RECSERVE_HOST": "127.0.0.1", "RECSERVE_PORT": str(grpc_port),
            "RECSERVE_METRICS_HOST": "127.0.0.1", "RECSERVE_METRICS_PORT": str(metrics_port),
        }  # fmt: skip
        if tier in NEXT:
            config["data"]["RECSERVE_NEXT"] = f"127.0.0.1:{ports[NEXT[tier]][0]}"
        spec = copy.deepcopy(workload["spec"]["template"]["spec"])
        spec["hostNetwork"] = True
        spec["restartPolicy"] = "Never"
        for container in spec["containers"]:
            container.pop("ports", None)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                container[probe]["grpc"]["port"] = grpc_port
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{prefix}-{tier}", "labels": workload["spec"]["template"]["metadata"]["labels"]},
            "spec": spec,
        }
        pods[tier] = ([config, pod], grpc_port, metrics_port)
    return pods


@pytest.fixture(scope="module")
def podman_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    folder = tmp_path_factory.mktemp("podman")
    env = podman_env(folder)
    if subprocess.run(["podman", "info"], capture_output=True, env=env, check=False).returncode != 0:
        pytest.fail("podman does not work here: run `make podman-ready` (root installs it), or use `make test`")
    load_images(env)
    prefix = f"recserve-k8s-{os.getpid()}"
    pods = podman_pods(render(K8S / "overlays" / "single-node"), prefix)
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
        yield {tier: port for tier, (_, port, _) in pods.items()}
    finally:
        for tier in TIERS:
            logs = subprocess.run(["podman", "logs", "--tail", "30", f"{prefix}-{tier}-tier"], capture_output=True,
                                  text=True, env=env, check=False)  # fmt: skip
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
