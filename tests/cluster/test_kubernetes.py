"""deploy/kubernetes checked offline: every manifest against the Kubernetes API schemas
(shipped inside the kubernetes-validate package), and every command line, port, probe,
volume and secret against what `bnserver` accepts and the other manifests provide."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bnserver.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes release the manifests promise to fit (gRPC probes are GA since 1.27).
KUBERNETES = "1.27.0"

FILE_FLAGS = ("auth_file", "peer_token_file", "coordinator_token_file")


def _documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, component: str | None = None) -> dict:
    found = [
        d
        for d in _documents()
        if d["kind"] == kind
        and (
            component is None or d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
    ]
    assert len(found) == 1, (kind, component)
    return found[0]


@pytest.mark.parametrize("version", [KUBERNETES, "1.33.0"])
def test_manifests_validate_against_the_api_schemas(version: str) -> None:
    docs = [d for d in _documents() if d["kind"] != "Kustomization"]
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "StatefulSet", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_would_catch_a_mistake() -> None:
    broken = copy.deepcopy(_one("StatefulSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_kustomization_applies_every_workload() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    workloads = {p.name for p in DEPLOY.glob("*.yaml") if p.name not in ("kustomization.yaml",)} - {
        "secret.example.yaml"
    }
    assert set(kustomization["resources"]) == workloads


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _args(workload: dict):
    container = _container(workload)
    assert container["command"] == ["bnserver"]
    return build_parser().parse_args(container["args"])


def _mounted_secret_keys(workload: dict) -> dict[str, str]:
    """Path of each file the pod mounts from a Secret -> the Secret key it holds."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in _container(workload)["volumeMounts"]:
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            continue
        assert secret["secretName"] == _one("Secret")["metadata"]["name"]
        for item in secret["items"]:
            files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    return files


@pytest.mark.parametrize(
    "kind, component", [("Deployment", "coordinator"), ("StatefulSet", "server")]
)
def test_workloads_run_bnserver_with_probes_metrics_and_secrets(kind: str, component: str) -> None:
    workload = _one(kind, component)
    args = _args(workload)
    assert args.command == ("coordinator" if component == "coordinator" else "serve")
    assert args.host == "0.0.0.0"
    container = _container(workload)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": args.port}, probe
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # Every token file the command line names comes from the Secret, under a key it has.
    secret_keys = set(_one("Secret")["stringData"])
    mounted = _mounted_secret_keys(workload)
    named = [str(getattr(args, flag)) for flag in FILE_FLAGS if getattr(args, flag, None)]
    assert named, "tokens are on"
    for path in named:
        assert mounted.get(path) in secret_keys, path
    grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.grace
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_servers_keep_state_on_a_volume_each_and_reach_the_coordinator() -> None:
    servers = _one("StatefulSet", "server")
    args = _args(servers)
    claims = {t["metadata"]["name"] for t in servers["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(servers)["volumeMounts"]}
    assert mounts[str(args.state_dir)] in claims
    # Peers share one token: what servers present is what the coordinator accepts.
    coordinator = _one("Deployment", "coordinator")
    coordinator_args = _args(coordinator)
    sent = _mounted_secret_keys(servers)[str(args.coordinator_token_file)]
    accepted = _mounted_secret_keys(coordinator)[str(coordinator_args.peer_token_file)]
    assert sent == accepted
    # --coordinator names the coordinator's Service and port, which selects its pods.
    host, port = args.coordinator.rsplit(":", 1)
    service = _one("Service", "coordinator")
    assert host == service["metadata"]["name"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port) == coordinator_args.port
    pod_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # Servers are addressed one by one through their headless Service.
    headless = _one("Service", "server")
    assert headless["spec"]["clusterIP"] == "None"
    assert servers["spec"]["serviceName"] == headless["metadata"]["name"]
    (server_port,) = headless["spec"]["ports"]
    assert server_port["port"] == args.port
