"""deploy/docker-compose.yml cannot run here (no Docker engine), so check its wiring:
every service, port, healthcheck, dependency, and every FTOPS_ variable it sets is a real
setting of that service."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    return data


def test_all_services_and_infrastructure_present(compose: dict[str, Any]) -> None:
    assert set(SERVICES) | {"nats", "redis", "postgres"} <= set(compose["services"])
    assert "-js" in compose["services"]["nats"]["command"]


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_built_checked_and_ordered(compose: dict[str, Any], name: str) -> None:
    svc = compose["services"][name]
    assert svc["build"]["args"]["SERVICE"] == name
    assert (ROOT / svc["build"]["context"].replace("..", ".") / svc["build"]["dockerfile"]).exists()
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
    module, _, cls = SETTINGS[name].partition(":")
    fields = set(getattr(importlib.import_module(module), cls).model_fields)
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
