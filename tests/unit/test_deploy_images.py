"""The Dockerfiles under deploy/docker cannot be built here (no Docker engine), so check
what they promise: one per service plus the GPU images, a non-root user, the service's
own extra (torch from the CPU index for CPU images, vLLM on a CUDA base for GPU
inference), FTOPS_ variables that are real settings, and an entry point that exists."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy/docker"
SETTINGS = {
    "registry": "ftops_registry.settings:RegistrySettings",
    "trainer": "ftops_trainer.settings:TrainerSettings",
    "inference": "ftops_inference.settings:InferenceSettings",
    "gateway": "ftops_gateway.settings:GatewaySettings",
    "monitor": "ftops_monitor.settings:MonitorSettings",
}
# image -> the service it runs
IMAGES = {
    "registry": "registry",
    "trainer": "trainer",
    "inference": "inference",
    "gateway": "gateway",
    "monitor": "monitor",
    "inference-gpu": "inference",
    "trainer-gpu": "trainer",
}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Dockerfile:
    """The instructions of the final stage that matter here (continuations joined)."""

    stages: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    expose: set[int] = field(default_factory=set)
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: str = ""
    runs: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)


def parse_dockerfile(path: Path) -> Dockerfile:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    result = Dockerfile()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            result.stages.append(rest)
        elif op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                result.env[key] = value
        elif op == "EXPOSE":
            result.expose |= {int(p.split("/")[0]) for p in rest.split()}
        elif op == "USER":
            result.user = rest
        elif op == "ENTRYPOINT":
            result.entrypoint = eval_json_list(rest)
        elif op == "HEALTHCHECK":
            result.healthcheck = rest
        elif op == "RUN":
            result.runs.append(rest)
        elif op == "COPY":
            result.copies.append(rest)
    return result


def eval_json_list(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list)
    return [str(v) for v in value]


def settings_fields(service: str) -> dict[str, Any]:
    module, _, cls = SETTINGS[service].partition(":")
    fields: dict[str, Any] = getattr(importlib.import_module(module), cls).model_fields
    return fields


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def test_one_dockerfile_per_image() -> None:
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKER.glob("*.Dockerfile")} == set(IMAGES)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_runs_the_service_as_non_root(image: str, pyproject: dict[str, Any]) -> None:
    service = IMAGES[image]
    docker = parse_dockerfile(DOCKER / f"{image}.Dockerfile")
    assert docker.user.isdigit()
    assert int(docker.user) != 0
    assert docker.entrypoint == [f"ftops-{service}"]
    assert f"ftops-{service}" in pyproject["project"]["scripts"]
    # Binds every interface on the port the probes and compose use.
    assert docker.env["FTOPS_GRPC_HOST"] == "0.0.0.0"
    port = int(docker.env["FTOPS_GRPC_PORT"])
    assert port in docker.expose
    assert f"127.0.0.1:{port}" in docker.healthcheck
    assert "ftops_runtime.healthcheck" in docker.healthcheck


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_environment_names_real_settings(image: str) -> None:
    fields = settings_fields(IMAGES[image])
    docker = parse_dockerfile(DOCKER / f"{image}.Dockerfile")
    for key, value in docker.env.items():
        if not key.startswith("FTOPS_"):
            continue
        name = key.removeprefix("FTOPS_").lower()
        assert name in fields, f"{image}: {key} is not a setting"
        if name.endswith("_port"):
            assert int(value) in docker.expose, f"{image}: {key}={value} is not exposed"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_installs_only_the_service_extra(image: str, pyproject: dict[str, Any]) -> None:
    docker = parse_dockerfile(DOCKER / f"{image}.Dockerfile")
    [install] = [r for r in docker.runs if "pip install" in r]
    extras = set(re.findall(r'"\.\[([a-z,]+)\]"', install)[0].split(","))
    assert extras <= set(pyproject["project"]["optional-dependencies"])
    assert "devstack" not in extras
    assert "all" not in extras
    service = IMAGES[image]
    if image.endswith("-gpu") and service == "inference":
        # vLLM brings its own CUDA torch: the CPU-pinned ml extra must stay out.
        assert extras == {"vllm"}
        assert docker.stages[0].startswith("${CUDA_IMAGE}")
        for package in ("transformers", "peft", "safetensors", "tokenizers"):
            assert package in install
    else:
        assert extras == {service}
    cpu_torch = CPU_TORCH_INDEX in install
    needs_torch = "ftops[ml]" in " ".join(pyproject["project"]["optional-dependencies"][service])
    assert cpu_torch == (needs_torch and not image.endswith("-gpu")), image


def test_gpu_inference_image_is_built_on_cuda() -> None:
    text = (DOCKER / "inference-gpu.Dockerfile").read_text()
    [default] = re.findall(r"ARG CUDA_IMAGE=(\S+)", text)
    assert default.startswith("nvidia/cuda:")
    docker = parse_dockerfile(DOCKER / "inference-gpu.Dockerfile")
    assert docker.env["FTOPS_BACKEND"] == "vllm"
    assert "vllm" in str(settings_fields("inference")["backend"].annotation)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copied_sources_exist(image: str) -> None:
    for copy in parse_dockerfile(DOCKER / f"{image}.Dockerfile").copies:
        if copy.startswith("--from"):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{image}: COPY {source}"


def _gpu_constraints() -> Any:
    """deploy/docker/gpu_constraints.py (a script beside the Dockerfiles, not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_constraints", DOCKER / "gpu_constraints.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_installs_the_pinned_versions(image: str) -> None:
    """CPU images install from constraints.txt (what the tests pass with), GPU images from
    constraints of their own (another torch)."""
    docker = parse_dockerfile(DOCKER / f"{image}.Dockerfile")
    [install] = [r for r in docker.runs if "pip install" in r]
    gpu = image.endswith("-gpu")
    lock = f"constraints-{image}.txt" if gpu else "constraints.txt"
    assert f"pip install -c {lock} " in install
    source = f"deploy/docker/{lock}" if gpu else lock
    assert any(source in copy.split()[:-1] for copy in docker.copies), f"{image}: {lock} not copied"


def test_gpu_constraints_follow_the_cpu_lock(pyproject: dict[str, Any]) -> None:
    gpu = _gpu_constraints()
    cpu_lock = (ROOT / "constraints.txt").read_text()
    assert set(gpu.OVERRIDES) == {image for image in IMAGES if image.endswith("-gpu")}
    for image in gpu.OVERRIDES:
        assert gpu.path(image).read_text() == gpu.render(image, cpu_lock), (
            f"{gpu.path(image).name} is stale: run python deploy/docker/gpu_constraints.py"
        )
    pins = dict(
        line.split("==")
        for line in gpu.path("inference-gpu").read_text().splitlines()
        if "==" in line
    )
    # The pinned vLLM is the one the vllm extra allows; the CPU torch pin is not kept.
    [vllm_spec] = pyproject["project"]["optional-dependencies"]["vllm"]
    assert pins["vllm"].startswith(vllm_spec.removeprefix("vllm==").removesuffix("*"))
    assert pins["torch"] != "2.13.0"
    trainer = gpu.path("trainer-gpu").read_text()
    assert "torch==2.13.0" in trainer.splitlines()
