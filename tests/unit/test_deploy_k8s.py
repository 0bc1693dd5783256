"""The Kubernetes manifests under deploy/k8s, checked without a cluster: every YAML
document parses, and the invariants that keep a rollout safe hold in the base and in
every overlay (rendered with ``kubectl kustomize`` where kubectl is installed):

- each service Deployment is probed on its gRPC port (readiness = grpc.health.v1,
  liveness = the port accepts connections), with a termination grace period that covers
  the preStop pause plus the drain the service's settings ask for;
- HPAs and PDBs point at Deployments that exist; Services select pods and name ports
  that exist;
- images are the ones deploy/docker builds, with the ports those Dockerfiles expose;
- every FTOPS_ variable (direct, from the shared ConfigMap, from Secrets) is a setting
  of the service it is given to, and every Secret / ConfigMap / volume claim exists;
- NATS runs JetStream on 3 servers that route to each other; GPU pods ask for GPUs.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
DOCKER = ROOT / "deploy/docker"
SERVICES = ("registry", "trainer", "inference", "gateway", "monitor")
AUTOSCALED = ("gateway", "inference", "trainer")
SETTINGS = {
    "registry": "ftops_registry.settings:RegistrySettings",
    "trainer": "ftops_trainer.settings:TrainerSettings",
    "inference": "ftops_inference.settings:InferenceSettings",
    "gateway": "ftops_gateway.settings:GatewaySettings",
    "monitor": "ftops_monitor.settings:MonitorSettings",
}
# Settings whose sum is the longest a replica may take to stop after SIGTERM.
DRAIN_FIELDS = ("shutdown_grace_s", "drain_timeout_s")
OVERLAYS = ("dev", "production", "gpu")
GPU = "nvidia.com/gpu"

Docs = list[dict[str, Any]]


def settings_fields(service: str) -> dict[str, Any]:
    module, _, cls = SETTINGS[service].partition(":")
    fields: dict[str, Any] = getattr(importlib.import_module(module), cls).model_fields
    return fields


def load_yaml(path: Path) -> Docs:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def base_docs() -> Docs:
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_yaml(K8S / "base" / name)]


def render(overlay: str, tmp: Path) -> Docs:
    """The overlay as kustomize renders it, with the production secrets taken from their
    committed examples (the real files are never in git)."""
    tree = tmp / "k8s"
    shutil.copytree(K8S, tree)
    for example in (tree / "overlays/production/secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = subprocess.run(
        ["kubectl", "kustomize", str(tree / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def by_kind(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return result


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in containers(deployment) if c["name"] == deployment["metadata"]["name"]]
    return container


def env_of(container: dict[str, Any], docs: Docs) -> dict[str, str]:
    """Every variable the container gets, with its value where the manifests say it
    (ConfigMaps and direct values; Secrets are placeholders, given as "")."""
    env: dict[str, str] = {}
    maps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            secret = secrets[source["secretRef"]["name"]]
            env.update(
                dict.fromkeys({**secret.get("stringData", {}), **secret.get("data", {})}, "")
            )
    for item in container.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def dockerfile_of(image: str) -> Path:
    name = image.rsplit("/", 1)[-1].split(":")[0]
    return DOCKER / f"{name}.Dockerfile"


def exposed(dockerfile: Path) -> set[int]:
    return {
        int(p)
        for line in re.findall(r"^EXPOSE (.+)$", dockerfile.read_text(), re.M)
        for p in line.split()
    }


def readiness_port(probe: dict[str, Any]) -> int:
    """The gRPC port a readiness probe asks grpc.health.v1 on: the kubelet's own probe,
    or (with TLS, which the kubelet's cannot speak) the image's healthcheck module."""
    if "grpc" in probe:
        assert "exec" not in probe
        return int(probe["grpc"]["port"])
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "-m", "ftops_runtime.healthcheck"], command
    host, port = command[3].rsplit(":", 1)
    assert host == "127.0.0.1", command  # the certificates name it (components/tls)
    return int(port)


# -- the invariants, for any set of manifests ------------------------------------------


def check_service_deployments(docs: Docs) -> None:
    deployments = by_kind(docs, "Deployment")
    config = by_kind(docs, "ConfigMap")
    for service in SERVICES:
        deployment = deployments[service]
        pod = deployment["spec"]["template"]["spec"]
        container = main_container(deployment)
        env = env_of(container, docs)
        grpc_port = int(env["FTOPS_GRPC_PORT"])
        assert ports(container)["grpc"] == grpc_port
        assert env["FTOPS_GRPC_HOST"] == "0.0.0.0"
        assert readiness_port(container["readinessProbe"]) == grpc_port, service
        liveness = container["livenessProbe"]["tcpSocket"]["port"]
        assert liveness in ("grpc", grpc_port), service

        fields = settings_fields(service)
        drain = sum(
            float(env.get(f"FTOPS_{name.upper()}", fields[name].default))
            for name in DRAIN_FIELDS
            if name in fields
        )
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pause = float(pre_stop["command"][-1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= pause + drain, f"{service}: grace {grace} < {pause} + drain {drain}"

        for key in env:
            if key.startswith("FTOPS_"):
                assert key.removeprefix("FTOPS_").lower() in fields, f"{service}: {key}"
        for name in [s["configMapRef"]["name"] for s in container.get("envFrom", [])]:
            assert name in config
        assert container["resources"]["requests"], service
        assert "memory" in container["resources"]["limits"], service
        assert pod["securityContext"]["runAsNonRoot"] is True

        dockerfile = dockerfile_of(container["image"])
        assert dockerfile.exists(), container["image"]
        assert set(ports(container).values()) <= exposed(dockerfile), service
        if container["securityContext"].get("readOnlyRootFilesystem"):
            # What the image writes to must be a volume: temp files and its HOME (caches).
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            home = re.findall(r"\bHOME=(\S+)", dockerfile.read_text())
            assert {"/tmp", *home} <= mounts, f"{service}: {mounts}"


def check_references(docs: Docs) -> None:
    secrets = by_kind(docs, "Secret")
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    maps = by_kind(docs, "ConfigMap")
    for workload in [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]:
        pod = workload["spec"]["template"]["spec"]
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps
        for container in pod["containers"]:
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | templates
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = secrets[ref["name"]]
                    keys = {**secret.get("stringData", {}), **secret.get("data", {})}
                    assert ref["key"] in keys, f"{ref['name']} has no {ref['key']}"


def check_autoscalers_and_budgets(docs: Docs) -> None:
    deployments = by_kind(docs, "Deployment")
    workloads = {**deployments, **by_kind(docs, "StatefulSet")}
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(AUTOSCALED) <= set(hpas)
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        assert target["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    budgets = by_kind(docs, "PodDisruptionBudget")
    for name in (*SERVICES, "nats"):
        labels = workloads[name]["spec"]["template"]["metadata"]["labels"]
        assert any(matches(b["spec"]["selector"]["matchLabels"], labels) for b in budgets.values())
    for budget in budgets.values():
        selected = [
            w
            for w in workloads.values()
            if matches(
                budget["spec"]["selector"]["matchLabels"],
                w["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert selected, f"PDB {budget['metadata']['name']} selects nothing"
        if "minAvailable" in budget["spec"]:
            replicas = min(w["spec"].get("replicas", 1) for w in selected)
            scaler = hpas.get(selected[0]["metadata"]["name"])
            if scaler is not None:
                replicas = min(replicas, scaler["spec"]["minReplicas"])
            # A budget as large as the replica count would block every node drain.
            assert budget["spec"]["minAvailable"] < replicas, budget["metadata"]["name"]


def check_services(docs: Docs) -> None:
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in by_kind(docs, "Service").values():
        pods = [
            w
            for w in workloads
            if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        named = {name for w in pods for c in containers(w) for name in ports(c)}
        numbers = {n for w in pods for c in containers(w) for n in ports(c).values()}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in named or target in numbers, (service["metadata"]["name"], target)


def check_nats(docs: Docs) -> None:
    nats = by_kind(docs, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["serviceName"] in by_kind(docs, "Service")
    conf = by_kind(docs, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in conf
    for i in range(3):
        assert f"nats://nats-{i}.{nats['spec']['serviceName']}:6222" in conf
    common = by_kind(docs, "ConfigMap")["ftops-common"]["data"]
    host = common["FTOPS_NATS_URL"].split("://", 1)[1].split(":")[0]
    assert host in by_kind(docs, "Service")


def check_all(docs: Docs) -> None:
    check_service_deployments(docs)
    check_references(docs)
    check_autoscalers_and_budgets(docs)
    check_services(docs)
    check_nats(docs)


# -- tests ---------------------------------------------------------------------------


def test_every_manifest_parses_and_is_used() -> None:
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml(path):
            assert isinstance(doc, dict), path
    listed = set(yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_base_manifests_hold_the_invariants() -> None:
    check_all(base_docs())


def test_postgres_and_secrets() -> None:
    docs = base_docs()
    postgres = by_kind(docs, "StatefulSet")["postgres"]
    env = {e["name"]: e for e in containers(postgres)[0]["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    registry = main_container(by_kind(docs, "Deployment")["registry"])
    url = {e["name"]: e for e in registry["env"]}["FTOPS_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"]["name"] == "ftops-postgres"
    # Committed secrets are placeholders only.
    for secret in by_kind(docs, "Secret").values():
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value or key == "POSTGRES_USER", key


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Docs]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (kustomize) is not installed")
    tmp = tmp_path_factory.mktemp("kustomize")
    return {overlay: render(overlay, tmp / overlay) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_the_invariants(rendered: dict[str, Docs], overlay: str) -> None:
    check_all(rendered[overlay])


def test_dev_overlay_builds_the_model_inference_loads(rendered: dict[str, Docs]) -> None:
    docs = rendered["dev"]
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"ftops-dev"}
    job = by_kind(docs, "Job")["model-init"]
    command = containers(job)[0]["command"]
    inference = env_of(main_container(by_kind(docs, "Deployment")["inference"]), docs)
    assert command[command.index("--out") + 1] == inference["FTOPS_BASE_MODEL_PATH"]
    assert inference["FTOPS_DEV_MODE"] == "true"
    # The collector's trace exporter has somewhere to go.
    collector = by_kind(docs, "ConfigMap")["otel-collector"]["data"]["config.yaml"]
    exporter = yaml.safe_load(collector)["exporters"]["otlp/traces"]["endpoint"]
    assert exporter.split(":")[0] in by_kind(docs, "Service")


def test_gpu_overlay_puts_inference_and_trainer_on_gpus(rendered: dict[str, Docs]) -> None:
    deployments = by_kind(rendered["gpu"], "Deployment")
    for name in ("inference", "trainer"):
        pod = deployments[name]["spec"]["template"]["spec"]
        container = main_container(deployments[name])
        assert container["resources"]["limits"][GPU] >= 1
        assert pod["nodeSelector"]
        assert any(t["key"] == GPU for t in pod["tolerations"])
        assert container["image"].split(":")[0].endswith(f"{name}-gpu")
    inference = env_of(main_container(deployments["inference"]), rendered["gpu"])
    assert inference["FTOPS_BACKEND"] == "vllm"
    assert inference["FTOPS_DEVICE"] == "cuda"
    for name in ("gateway", "registry", "monitor"):
        assert GPU not in main_container(deployments[name])["resources"].get("limits", {})


def test_production_overlay_needs_real_secret_files() -> None:
    kustomization = yaml.safe_load((K8S / "overlays/production/kustomization.yaml").read_text())
    secrets = K8S / "overlays/production/secrets"
    for generator in kustomization["secretGenerator"]:
        for env_file in generator["envs"]:
            assert (K8S / "overlays/production" / f"{env_file}.example").exists()
    assert "*.env" in (secrets / ".gitignore").read_text().split()


def test_production_overlay_secures_every_transport(rendered: dict[str, Docs]) -> None:
    docs = rendered["production"]
    deployments = by_kind(docs, "Deployment")
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    for service in SERVICES:
        deployment = deployments[service]
        container = main_container(deployment)
        env = env_of(container, docs)
        # Its own certificate Secret, mounted where the settings point.
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret = volumes[mounts["/etc/ftops/tls"]]["secret"]["secretName"]
        assert secret == f"ftops-tls-{service}"
        for setting in ("FTOPS_TLS_CERT_FILE", "FTOPS_TLS_KEY_FILE", "FTOPS_TLS_CA_FILE"):
            assert env[setting].startswith("/etc/ftops/tls/"), (service, setting)
        spec = certificates[secret]
        assert service in spec["dnsNames"]
        assert "127.0.0.1" in spec["ipAddresses"]  # the in-pod readiness probe
        assert "client auth" in spec["usages"]
        # Client certificates between services; applications reach the gateway with keys.
        required = env["FTOPS_TLS_REQUIRE_CLIENT_CERT"]
        assert required == ("false" if service == "gateway" else "true"), service
        assert env["FTOPS_NATS_URL"].startswith("tls://")
        assert env["FTOPS_NATS_USER"]
        assert "FTOPS_NATS_PASSWORD" in env
        assert "exec" in container["readinessProbe"]
    gateway = env_of(main_container(deployments["gateway"]), docs)
    inference = certificates["ftops-tls-inference"]
    assert gateway["FTOPS_INFERENCE_TLS_SERVER_NAME"] in inference["dnsNames"]
    conf = by_kind(docs, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "tls {" in conf
    assert "password: $NATS_PASSWORD" in conf
    nats = by_kind(docs, "StatefulSet")["nats"]
    nats_env = {e["name"]: e for e in containers(nats)[0]["env"]}
    assert "secretKeyRef" in nats_env["NATS_PASSWORD"]["valueFrom"]
    assert "nats" in certificates["ftops-tls-nats"]["dnsNames"]
