"""deploy/docker-compose.yml cannot run here (no Docker engine), so check its wiring:
every service, image, port, healthcheck and dependency, every FTOPS_ variable it sets is
a real setting of that service, and telemetry flows services -> collector -> Jaeger and
Prometheus on ports that agree with the configs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = ("registry", "trainer", "inference", "gateway", "monitor")
SETTINGS = {
    "registry": "ftops_registry.settings:RegistrySettings",
    "trainer": "ftops_trainer.settings:TrainerSettings",
    "inference": "ftops_inference.settings:InferenceSettings",
    "gateway": "ftops_gateway.settings:GatewaySettings",
    "monitor": "ftops_monitor.settings:MonitorSettings",
}
# Which infrastructure each service needs before it can report SERVING.
REQUIRED_DEPS = {
    "registry": {"nats", "postgres"},
    "trainer": {"nats", "registry"},
    "inference": {"nats", "registry"},
    "gateway": {"nats", "redis", "registry", "inference"},
    "monitor": {"nats"},
}
OBSERVABILITY = ("otel-collector", "jaeger", "prometheus")


def settings_fields(name: str) -> dict[str, Any]:
    module, _, cls = SETTINGS[name].partition(":")
    fields: dict[str, Any] = getattr(importlib.import_module(module), cls).model_fields
    return fields


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (DEPLOY / "observability/otel-collector.yaml").read_text()
    )
    return data


def test_all_services_and_infrastructure_present(compose: dict[str, Any]) -> None:
    assert {*SERVICES, "nats", "redis", "postgres", *OBSERVABILITY} <= set(compose["services"])
    assert "-js" in compose["services"]["nats"]["command"]


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_built_checked_and_ordered(compose: dict[str, Any], name: str) -> None:
    svc = compose["services"][name]
    assert svc["build"]["dockerfile"] == f"deploy/docker/{name}.Dockerfile"
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().exists()
    assert svc["image"].split(":")[0] == f"ftops/{name}"
    assert importlib.util.find_spec(f"ftops_{name}") is not None
    assert "ftops_runtime.healthcheck" in " ".join(svc["healthcheck"]["test"])
    deps = svc["depends_on"]
    assert REQUIRED_DEPS[name] <= set(deps), f"{name} misses {REQUIRED_DEPS[name] - set(deps)}"
    for dep, cond in deps.items():
        assert dep in compose["services"]
        if dep != "model-init":
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in compose["services"][dep], f"{dep} has no healthcheck"


def test_host_ports_are_unique(compose: dict[str, Any]) -> None:
    host_ports = [
        str(p).split(":")[0] for svc in compose["services"].values() for p in svc.get("ports", [])
    ]
    assert len(host_ports) == len(set(host_ports))


@pytest.mark.parametrize("name", SERVICES)
def test_environment_names_real_settings(compose: dict[str, Any], name: str) -> None:
    fields = settings_fields(name)
    env = compose["services"][name]["environment"]
    for key in env:
        assert key.startswith("FTOPS_"), key
        assert key.removeprefix("FTOPS_").lower() in fields, f"{name}: {key} is not a setting"


def test_addresses_point_at_compose_services(compose: dict[str, Any]) -> None:
    names = set(compose["services"])
    for svc in compose["services"].values():
        for key, value in (svc.get("environment") or {}).items():
            if key in {"FTOPS_REGISTRY_ADDRESS", "FTOPS_INFERENCE_ENDPOINTS"}:
                for address in str(value).split(","):
                    assert address.split(":")[0] in names, f"{key}={value}"


def test_mounted_config_files_exist(compose: dict[str, Any]) -> None:
    for svc in compose["services"].values():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).is_file(), source


def test_services_export_telemetry_to_the_collector(
    compose: dict[str, Any], collector: dict[str, Any]
) -> None:
    endpoint = compose["x-env"]["FTOPS_OTLP_ENDPOINT"]
    # "${FTOPS_OTLP_ENDPOINT:-http://otel-collector:4317}": the default is the collector.
    url = urlparse(endpoint.split(":-", 1)[1].rstrip("}"))
    assert url.hostname == "otel-collector"
    grpc_receiver = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc_receiver.rsplit(":", 1)[1] == str(url.port)
    for name in SERVICES:
        env = compose["services"][name]["environment"]
        assert env["FTOPS_OTLP_ENDPOINT"] == endpoint


def test_collector_pipelines_use_what_it_defines(collector: dict[str, Any]) -> None:
    pipelines = collector["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for pipeline in pipelines.values():
        assert set(pipeline["receivers"]) <= set(collector["receivers"])
        assert set(pipeline.get("processors", [])) <= set(collector["processors"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])
    assert set(collector["service"]["extensions"]) <= set(collector["extensions"])


def test_traces_reach_jaeger(compose: dict[str, Any], collector: dict[str, Any]) -> None:
    [exporter] = collector["service"]["pipelines"]["traces"]["exporters"]
    host, port = collector["exporters"][exporter]["endpoint"].split(":")
    assert host == "jaeger"
    assert port == "4317"  # Jaeger v2 takes OTLP/gRPC on 4317
    assert compose["services"]["jaeger"]["image"].startswith("jaegertracing/jaeger:2")


def test_prometheus_scrapes_the_collector_and_the_monitor(
    compose: dict[str, Any], collector: dict[str, Any]
) -> None:
    config = yaml.safe_load((DEPLOY / "observability/prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert targets["otel-collector"] == f"otel-collector:{exporter_port}"
    monitor_port = compose["services"]["monitor"]["environment"]["FTOPS_METRICS_PORT"]
    assert targets["ftops-monitor"] == f"monitor:{monitor_port}"
    assert str(settings_fields("monitor")["metrics_port"].default) == monitor_port
    for target in targets.values():
        assert target.split(":")[0] in compose["services"]


def test_gateway_publishes_the_openai_endpoint(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    port = gateway["environment"]["FTOPS_HTTP_PORT"]
    assert f"{port}:{port}" in gateway["ports"]


# -- transport security (docker-compose.tls.yml) ---------------------------------------


@pytest.fixture(scope="module")
def tls_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.tls.yml").read_text())
    return data


@pytest.mark.parametrize("name", SERVICES)
def test_tls_overlay_gives_each_service_its_certificate_and_nats_credentials(
    compose: dict[str, Any], tls_compose: dict[str, Any], name: str
) -> None:
    from ftops_devstack.certs import COMPOSE_SERVICES

    svc = tls_compose["services"][name]
    env = svc["environment"]
    fields = settings_fields(name)
    for key in env:
        assert key.removeprefix("FTOPS_").lower() in fields, f"{name}: {key} is not a setting"
    assert env["FTOPS_NATS_URL"].startswith("tls://nats:")
    assert env["FTOPS_NATS_USER"]
    assert env["FTOPS_NATS_PASSWORD"].startswith("${FTOPS_NATS_PASSWORD:?")
    # Mutual TLS between services; the gateway faces applications without certificates.
    assert env["FTOPS_TLS_REQUIRE_CLIENT_CERT"] == ("false" if name == "gateway" else "true")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    for setting in ("FTOPS_TLS_CERT_FILE", "FTOPS_TLS_KEY_FILE", "FTOPS_TLS_CA_FILE"):
        assert env[setting] in mounts, f"{name}: {setting} is not mounted"
    # Its own certificate and key (made by ftops_devstack.certs), nobody else's key.
    assert mounts[env["FTOPS_TLS_CERT_FILE"]] == f"./tls/{name}.pem"
    assert mounts[env["FTOPS_TLS_KEY_FILE"]] == f"./tls/{name}-key.pem"
    assert mounts[env["FTOPS_TLS_CA_FILE"]] == "./tls/ca.pem"
    assert name in COMPOSE_SERVICES
    keys = [source for source in mounts.values() if source.endswith("-key.pem")]
    assert keys == [f"./tls/{name}-key.pem"]
    # The base stack's healthcheck still applies (127.0.0.1 is in every certificate).
    assert "healthcheck" not in svc
    assert "127.0.0.1" in compose["services"][name]["healthcheck"]["test"][-1]


def test_tls_overlay_nats_wants_tls_and_a_password(tls_compose: dict[str, Any]) -> None:
    nats = tls_compose["services"]["nats"]
    command = nats["command"]
    assert "-js" in command
    assert "--tls" in command
    assert command[command.index("--user") + 1] == "ftops"
    assert command[command.index("--pass") + 1] == "${FTOPS_NATS_PASSWORD:?set FTOPS_NATS_PASSWORD}"
    mounted = {v.split(":")[1] for v in nats["volumes"]}
    assert command[command.index("--tlscert") + 1] in mounted
    assert command[command.index("--tlskey") + 1] in mounted


def test_tls_overlay_prometheus_scrapes_the_monitor_over_https(
    tls_compose: dict[str, Any],
) -> None:
    volumes = tls_compose["services"]["prometheus"]["volumes"]
    [config_mount] = [v for v in volumes if v.split(":")[1] == "/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "ftops-monitor"]
    assert job["scheme"] == "https"
    assert job["tls_config"]["ca_file"] in {v.split(":")[1] for v in volumes}


def test_tls_overlay_files_are_the_ones_the_cert_tool_writes(
    tls_compose: dict[str, Any], tmp_path: Path
) -> None:
    from ftops_devstack.certs import write_compose_pki

    write_compose_pki(tmp_path)
    for svc in tls_compose["services"].values():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./tls/"):
                assert (tmp_path / source.removeprefix("./tls/")).is_file(), source
            elif source.startswith("./"):
                assert (DEPLOY / source).is_file(), source
