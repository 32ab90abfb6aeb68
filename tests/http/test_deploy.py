"""deploy/k8s/ agrees with the server it deploys: container args parse with `quiver serve`'s own
parser, and ports, probes, labels and the endpoint picker's settings line up with what it serves."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from runtime.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, over every file in deploy/k8s/."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def quiver_pod(docs):
    return docs[("Deployment", "quiver")]["spec"]["template"]


@pytest.fixture(scope="module")
def serve_args(quiver_pod):
    container = quiver_pod["spec"]["containers"][0]
    assert container["command"] == ["quiver"]
    return build_parser().parse_args(container["args"])  # the real `quiver serve` parser


def port_named(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_args_parse_and_ports_match_the_flags(quiver_pod, serve_args):
    c = quiver_pod["spec"]["containers"][0]
    assert serve_args.command == "serve" and serve_args.host == "0.0.0.0"
    assert port_named(c, "http") == serve_args.http_port
    assert port_named(c, "grpc") == serve_args.port


def test_probes_hit_health_on_the_http_port(quiver_pod, serve_args):
    c = quiver_pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http"
    assert "httpGet" not in c["livenessProbe"]  # a draining pod's 503 must not restart it


def test_drain_fits_in_the_termination_grace_period(quiver_pod, serve_args):
    assert quiver_pod["spec"]["terminationGracePeriodSeconds"] > serve_args.grace_period + 5


def test_adapter_store_is_the_mounted_shared_volume(docs, quiver_pod, serve_args):
    c = quiver_pod["spec"]["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == serve_args.adapter_dir)
    volume = next(v for v in quiver_pod["spec"]["volumes"] if v["name"] == mount["name"])
    claim = docs[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert "ReadOnlyMany" in claim["spec"]["accessModes"]
    assert any(e["name"] == "QUIVER_ADMIN_TOKEN" for e in c["env"])  # the adapter routes are guarded


def test_service_and_pool_select_the_pods_on_the_http_port(docs, quiver_pod, serve_args):
    labels = quiver_pod["metadata"]["labels"]
    svc = docs[("Service", "quiver")]
    assert svc["spec"]["selector"].items() <= labels.items()
    pool = docs[("InferencePool", "quiver-pool")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [serve_args.http_port]
    epp_svc = docs[("Service", pool["spec"]["endpointPickerRef"]["name"])]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp_svc["spec"]["ports"]]
    route = docs[("HTTPRoute", "quiver")]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "quiver-pool")


def test_endpoint_picker_turns_lora_affinity_on(docs):
    cfg = yaml.safe_load(docs[("ConfigMap", "quiver-epp-config")]["data"]["epp-config.yaml"])
    assert cfg["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in cfg["plugins"]}
    assert "lora-affinity-scorer" in types
    profile = cfg["schedulingProfiles"][0]["plugins"]
    refs = {p["pluginRef"]: p.get("weight") for p in profile}
    assert refs["lora-affinity-scorer"] > 0 and set(refs) <= types
    args = docs[("Deployment", "quiver-epp")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == "quiver-pool"


@pytest.mark.slow
def test_the_server_serves_what_the_manifests_probe_and_scrape(http_server):
    """/health for the probes, and on /metrics the series the endpoint picker reads."""
    base = f"http://127.0.0.1:{http_server.http_port}"
    assert httpx.get(base + "/health").status_code == 200
    text = httpx.get(base + "/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info{"):
        assert name in text
