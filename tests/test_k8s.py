"""Kubernetes manifests (deploy/k8s): parsed, cross-checked with each other, docker-compose.yml's Triton
flags and the real ``gftriton`` parser. Each consistency check is a function that returns its problems;
a deliberately broken copy of the manifests must be reported (negative controls)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "deploy" / "k8s"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def _load() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            manifests[(doc["kind"], doc["metadata"]["name"])] = doc
    return manifests


@pytest.fixture()
def manifests() -> dict:
    return _load()


def _triton_container(manifests: dict) -> dict:
    (container,) = manifests[("Deployment", "gftriton")]["spec"]["template"]["spec"]["containers"]
    return container


def _normalized(args: list[str]) -> list[str]:
    """Server flags with the admin-key reference written the same way (compose ${...}, k8s $(...))."""
    return [re.sub(r"\$\{TRITON_ADMIN_KEY[^}]*\}|\$\(TRITON_ADMIN_KEY\)", "KEY", a) for a in args]


def selector_problems(manifests: dict) -> list[str]:
    """Deployment selector vs its pod labels; Service and HPA pointing at them."""
    problems = []
    deployment = manifests[("Deployment", "gftriton")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in selector.items()):
        problems.append(f"Deployment selector {selector} does not match its pod labels {labels}")
    service_selector = manifests[("Service", "gftriton")]["spec"]["selector"]
    if any(labels.get(k) != v for k, v in service_selector.items()):
        problems.append(f"Service selector {service_selector} matches no Triton pod ({labels})")
    target = manifests[("HorizontalPodAutoscaler", "gftriton")]["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", "gftriton"):
        problems.append(f"HPA scales {target}, not the Triton Deployment")
    return problems


def port_problems(manifests: dict) -> list[str]:
    """Container ports = compose's published ports; Service ports reach named container ports."""
    problems = []
    container = {p["name"]: p["containerPort"] for p in _triton_container(manifests)["ports"]}
    if container != PORTS:
        problems.append(f"container ports {container}, expected {PORTS}")
    for port in manifests[("Service", "gftriton")]["spec"]["ports"]:
        if port["targetPort"] not in container or port["port"] != PORTS.get(port["name"]):
            problems.append(f"Service port {port} does not reach the container's {port['name']} port")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if _triton_container(manifests)[probe]["httpGet"]["port"] not in container:
            problems.append(f"{probe} uses an undefined port")
    return problems


def test_kinds_and_names(manifests):
    assert set(manifests) == {("Deployment", "gftriton"), ("Service", "gftriton"),
                              ("HorizontalPodAutoscaler", "gftriton"), ("Job", "gftriton-isp")}
    assert manifests[("HorizontalPodAutoscaler", "gftriton")]["apiVersion"] == "autoscaling/v2"


def test_selectors_match_labels(manifests):
    assert selector_problems(manifests) == []
    broken = copy.deepcopy(manifests)
    broken[("Service", "gftriton")]["spec"]["selector"]["app.kubernetes.io/component"] = "triton"
    assert any("Service selector" in p for p in selector_problems(broken))
    broken = copy.deepcopy(manifests)
    broken[("Deployment", "gftriton")]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
    assert any("Deployment selector" in p for p in selector_problems(broken))


def test_ports_match_compose_and_service(manifests):
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    published = sorted(int(p.rsplit(":", 1)[1]) for p in compose["services"]["tritonserver"]["ports"])
    assert published == sorted(PORTS.values())
    assert port_problems(manifests) == []
    broken = copy.deepcopy(manifests)
    broken[("Service", "gftriton")]["spec"]["ports"][1]["targetPort"] = "grcp"
    assert port_problems(broken)


def test_triton_flags_equal_compose(manifests):
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    expected = compose["services"]["tritonserver"]["command"]
    container = _triton_container(manifests)
    assert _normalized([*container["command"], *container["args"]]) == _normalized(expected)
    # the admin key comes from a Secret, never from the manifest itself
    (env,) = [e for e in container["env"] if e["name"] == "TRITON_ADMIN_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "gftriton-admin-key", "key": "key"}
    assert any(a.startswith("--http-restricted-api=model-repository") for a in container["args"])
    assert any(a.startswith("--grpc-restricted-protocol=model-repository") for a in container["args"])
    assert container["image"] == compose["services"]["tritonserver"]["image"]
    assert "24.10" in (REPO_ROOT / "deploy" / "Dockerfile.tritonserver").read_text().split("ARG TRITON_IMAGE=")[1].split()[0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-repository"]["mountPath"] == "/models" and mounts["model-repository"]["readOnly"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_hpa_metric_is_served_by_the_adapter_rule(manifests):
    (metric,) = manifests[("HorizontalPodAutoscaler", "gftriton")]["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]
    assert int(metric["pods"]["target"]["averageValue"]) > 0


def test_client_job_points_at_the_service_and_parses(manifests):
    from geneformer_triton.cli import build_parser
    from geneformer_triton.client.dask_engine import ClusterOptions

    (container,) = manifests[("Job", "gftriton-isp")]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["gftriton"]
    args = build_parser().parse_args(container["args"])  # the real CLI accepts every option
    options = ClusterOptions.from_args(args)
    service = manifests[("Service", "gftriton")]
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert [(t.url, t.protocol) for t in options.servers] == [(f"{service['metadata']['name']}:8000", "http")]
    assert int(options.servers[0].url.rsplit(":", 1)[1]) in ports
    assert options.cluster == "local:8" and args.func.__module__ == "geneformer_triton.client.isp_cli"
    with pytest.raises(SystemExit):  # negative control: the parser does reject an unknown option
        build_parser().parse_args([*container["args"], "--no-such-option"])


def test_images_are_pinned(manifests):
    images = [c["image"] for doc in manifests.values() if doc["kind"] in ("Deployment", "Job")
              for c in doc["spec"]["template"]["spec"]["containers"]]
    assert images and all(":" in i and not i.endswith(":latest") for i in images)
