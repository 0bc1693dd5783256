"""The local stack's process layout: replica names, ports and per-replica settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ftops_devstack.stack import SERVICES, Stack


def _stack(tmp_path: Path, **replicas: int) -> Stack:
    stack = Stack(tmp_path, "nats://127.0.0.1:1", "redis://127.0.0.1:2", tmp_path / "model")
    stack.replicas = dict(replicas)
    return stack


def test_one_process_per_service_keeps_the_service_names(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    assert [n for s in SERVICES for n in stack.names(s)] == list(SERVICES)


def test_replicas_get_their_own_port_instance_and_cache(tmp_path: Path) -> None:
    stack = _stack(tmp_path, inference=2, gateway=3)
    assert stack.names("gateway") == ["gateway", "gateway-2", "gateway-3"]
    names = [n for s in SERVICES for n in stack.names(s)]
    names += [f"{n}-http" for n in stack.names("gateway")] + ["monitor-metrics"]
    ports = {name: 1000 + i for i, name in enumerate(names)}
    first, second = stack._env("inference", ports), stack._env("inference-2", ports)
    assert first["FTOPS_GRPC_PORT"] != second["FTOPS_GRPC_PORT"]
    assert (first["FTOPS_INSTANCE_ID"], second["FTOPS_INSTANCE_ID"]) == (
        "inference-1",
        "inference-2",
    )
    assert first["FTOPS_ADAPTER_CACHE_DIR"] != second["FTOPS_ADAPTER_CACHE_DIR"]
    # The replicas share the cores: a bounded torch thread pool each.
    assert 1 <= int(first["FTOPS_TORCH_THREADS"]) <= max(1, (os.cpu_count() or 1) // 4)
    # Every gateway knows every inference replica.
    gateway = stack._env("gateway-3", ports)
    assert gateway["FTOPS_INFERENCE_ENDPOINTS"] == (
        f"127.0.0.1:{ports['inference']},127.0.0.1:{ports['inference-2']}"
    )
    assert gateway["FTOPS_INSTANCE_ID"] == "gateway-3"
    # Each gateway serves the OpenAI-compatible API on its own port.
    assert gateway["FTOPS_HTTP_PORT"] == str(ports["gateway-3-http"])
    assert stack._env("gateway", ports)["FTOPS_HTTP_PORT"] == str(ports["gateway-http"])
    assert stack._env("monitor", ports)["FTOPS_METRICS_PORT"] == str(ports["monitor-metrics"])


def test_the_dev_stack_trainer_gates_the_tiny_model_at_what_it_can_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ftops train` with no gate flags on the dev stack gets a gate its tiny model can pass
    (the trainer's production default, 0.95, rejected the first job at 0.857)."""
    from ftops.trainer.v1 import trainer_pb2
    from ftops_devstack.__main__ import TINY_MODEL_MIN_RETENTION, dev_stack
    from ftops_trainer.settings import TrainerSettings
    from ftops_trainer.spec import effective_spec

    bare = trainer_pb2.JobSpec(adapter="bot")
    own = trainer_pb2.JobSpec(adapter="bot", gate=trainer_pb2.GateConfig(min_retention=0.9))
    for key in [k for k in os.environ if k.startswith("FTOPS_")]:
        monkeypatch.delenv(key)
    assert effective_spec(bare, TrainerSettings()).gate.min_retention == pytest.approx(0.95)

    stack = dev_stack(tmp_path, "nats://127.0.0.1:1", "redis://127.0.0.1:2", tmp_path, auth=True)
    names = [n for s in SERVICES for n in stack.names(s)] + ["gateway-http", "monitor-metrics"]
    env = stack._env("trainer", {name: 1000 + i for i, name in enumerate(names)})
    for key, value in env.items():
        if key.startswith("FTOPS_"):
            monkeypatch.setenv(key, value)
    settings = TrainerSettings()
    assert effective_spec(bare, settings).gate.min_retention == pytest.approx(
        TINY_MODEL_MIN_RETENTION
    )
    assert effective_spec(own, settings).gate.min_retention == pytest.approx(0.9)  # a job's own


def test_the_dashboard_link_carries_the_admin_key_only_with_access_control(
    tmp_path: Path,
) -> None:
    stack = _stack(tmp_path)
    stack._ports["monitor-metrics"] = 9464
    assert stack.dashboard_url() == "http://127.0.0.1:9464/dashboard"
    stack.auth, stack.api_key = True, "ftk_0123456789abcdef_secret"
    assert stack.dashboard_url() == (
        "http://127.0.0.1:9464/dashboard?key=ftk_0123456789abcdef_secret"
    )
