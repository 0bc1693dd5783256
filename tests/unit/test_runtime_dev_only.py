"""Fault injection is for tests and benchmarks: a production configuration that sets it
is refused at start, naming the setting; development mode (and the dev stack) accepts it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ftops_inference.settings import InferenceSettings
from ftops_runtime.app import run_service
from ftops_runtime.dev_only import dev_only_fields, dev_only_problems

FAULTS = {
    "FTOPS_FAULT_ERROR_RATE": "0.3",
    "FTOPS_FAULT_DELAY_FACTOR": "4",
    "FTOPS_FAULT_VERSIONS": "ver_bad",
}


def test_every_fault_setting_is_development_only() -> None:
    faults = {name for name in InferenceSettings.model_fields if name.startswith("fault_")}
    assert (
        faults
        == set(dev_only_fields(InferenceSettings))
        == {
            "fault_error_rate",
            "fault_delay_factor",
            "fault_versions",
        }
    )


def test_production_settings_with_faults_are_refused_one_problem_each() -> None:
    settings = InferenceSettings(fault_error_rate=0.3, fault_delay_factor=4.0)
    problems = dev_only_problems(settings)
    assert len(problems) == 2
    assert problems[0].startswith("FTOPS_FAULT_ERROR_RATE=0.3 ")
    assert problems[1].startswith("FTOPS_FAULT_DELAY_FACTOR=4.0 ")
    assert all("FTOPS_DEV_MODE=true" in p for p in problems)


def test_development_mode_and_the_defaults_are_accepted() -> None:
    assert dev_only_problems(InferenceSettings(fault_error_rate=1.0, dev_mode=True)) == []
    assert dev_only_problems(InferenceSettings()) == []


def test_the_service_entry_point_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FTOPS_DEV_MODE", "false")
    monkeypatch.setenv("FTOPS_AUTH_MODE", "enabled")
    monkeypatch.setenv("FTOPS_REGISTRY_API_KEY", "ftk_service_key")
    served: list[InferenceSettings] = []

    async def serve(settings: InferenceSettings, stop: asyncio.Event) -> None:
        served.append(settings)

    with pytest.raises(SystemExit) as info:
        run_service("inference", InferenceSettings, serve)
    message = str(info.value.code)
    for key in FAULTS:
        assert key in message
    assert served == []


def test_the_dev_stack_runs_in_development_mode_so_benchmarks_may_inject_faults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/release_under_load.py injects faults through Stack.extra_env."""
    from ftops_devstack.stack import SERVICES, Stack

    stack = Stack(tmp_path, "nats://127.0.0.1:1", "redis://127.0.0.1:2", tmp_path)
    stack.extra_env.update(FAULTS)
    names = [n for s in SERVICES for n in stack.names(s)] + ["gateway-http", "monitor-metrics"]
    env = stack._env("inference", {name: 1000 + i for i, name in enumerate(names)})
    for key, value in env.items():
        if key.startswith("FTOPS_"):
            monkeypatch.setenv(key, value)
    settings = InferenceSettings()
    assert settings.fault_error_rate == pytest.approx(0.3)
    assert dev_only_problems(settings) == []
