"""The stack with its inference service on vLLM, and what a machine without vLLM is told:
the command that installs it, at start, before anything runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftops_devstack.__main__ import _serve, dev_stack
from ftops_devstack.stack import SERVICES
from ftops_devstack.vllm_env import INSTALL_COMMAND, VLLMUnavailableError, vllm_python
from ftops_inference.settings import InferenceSettings
from ftops_inference.vllm_backend import vllm_installed

NO_VLLM = pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")


def test_the_inference_service_runs_on_vllm_from_its_own_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = dev_stack(
        tmp_path,
        "nats://127.0.0.1:1",
        "redis://127.0.0.1:2",
        tmp_path / "model",
        auth=False,
        vllm_python=Path("/opt/vllm/bin/python"),
    )
    assert stack.interpreter("inference") == "/opt/vllm/bin/python"
    assert stack.interpreter("gateway") == sys.executable
    names = [*SERVICES, "gateway-http", "monitor-metrics"]
    ports = {name: 1000 + i for i, name in enumerate(names)}
    inference = stack._env("inference", ports)
    assert inference["FTOPS_BACKEND"] == "vllm"
    for key, value in inference.items():
        if key.startswith("FTOPS_VLLM_"):
            monkeypatch.setenv(key, value)
    settings = InferenceSettings()  # the stack's vLLM settings are valid ones
    assert settings.vllm_dtype == "float32"
    assert settings.vllm_cpu_kvcache_space_gib > 0
    assert stack._env("gateway", ports).get("FTOPS_BACKEND") == os.environ.get("FTOPS_BACKEND")


def test_a_missing_vllm_environment_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTOPS_VLLM_PYTHON", str(tmp_path / "nothing" / "python"))
    with pytest.raises(VLLMUnavailableError, match=INSTALL_COMMAND):
        vllm_python()


@NO_VLLM
def test_an_environment_without_vllm_is_refused_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FTOPS_VLLM_PYTHON", sys.executable)
    with pytest.raises(VLLMUnavailableError, match="cannot import vllm"):
        vllm_python()


@NO_VLLM
async def test_ftops_dev_up_backend_vllm_without_vllm_stops_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FTOPS_VLLM_PYTHON", sys.executable)
    workdir = tmp_path / "dev"
    args = argparse.Namespace(backend="vllm", workdir=str(workdir), fresh=False)
    assert await _serve(args) == 2
    assert INSTALL_COMMAND in capsys.readouterr().out
    assert not workdir.exists()


@NO_VLLM
def test_ftops_inference_with_backend_vllm_without_vllm_refuses_to_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "FTOPS_BACKEND": "vllm",
        "FTOPS_BASE_MODEL_PATH": str(tiny_model_dir),
        "FTOPS_ADAPTER_CACHE_DIR": str(tmp_path / "cache"),
        "FTOPS_NATS_URL": "nats://127.0.0.1:1",
        "FTOPS_REGISTRY_ADDRESS": "127.0.0.1:1",
        "FTOPS_AUTH_MODE": "disabled",
        "FTOPS_DEV_MODE": "true",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ftops_inference"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "refusing to start" in done.stderr
    assert "make install-vllm" in done.stderr
    assert "Traceback" not in done.stderr
