"""What the vLLM backend decides without vLLM: finish-reason mapping, which errors are the
client's, the vllm_* settings refused before a minutes-long engine start, and the engine
built in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from ftops_inference.sampling import FinishReason
from ftops_inference.settings import InferenceSettings
from ftops_inference.vllm_backend import _finish_reason, _in_daemon_thread, _request_error_types
from ftops_runtime.errors import Unavailable


@pytest.mark.parametrize(
    ("reason", "stop_reason", "expected"),
    [
        ("stop", "\n\n", FinishReason.STOP),  # a stop string, named
        ("stop", None, FinishReason.EOS),
        ("stop", 2, FinishReason.EOS),  # an extra EOS id from generation_config
        ("length", None, FinishReason.LENGTH),
    ],
)
def test_finish_reasons_of_a_completed_generation(
    reason: str, stop_reason: int | str | None, expected: FinishReason
) -> None:
    assert _finish_reason(reason, stop_reason) == expected


@pytest.mark.parametrize("reason", ["abort", "error", "repetition", None])
def test_an_engine_ended_request_is_never_a_completion(reason: str | None) -> None:
    with pytest.raises(Unavailable, match="ended the request early"):
        _finish_reason(reason, None)


class _ClientError(Exception):
    pass


class _ValidationError(_ClientError):
    pass


def test_request_errors_are_vllms_client_errors_and_value_errors() -> None:
    newer = SimpleNamespace(VLLMClientError=_ClientError, VLLMValidationError=_ValidationError)
    kinds = _request_error_types(newer)
    assert isinstance(_ValidationError("temperature must be in [0, 2]"), kinds)
    assert isinstance(ValueError("prompt longer than max_model_len"), kinds)
    assert not isinstance(RuntimeError("EngineGenerateError"), kinds)


def test_request_errors_of_an_older_vllm_are_value_errors() -> None:
    assert _request_error_types(SimpleNamespace()) == (ValueError,)


def test_vllm_lora_rank_outside_vllms_set_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"vllm_max_lora_rank must be one of .* got 48"):
        InferenceSettings(vllm_max_lora_rank=48)


def test_vllm_lora_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTOPS_VLLM_MAX_LORA_RANK", "16")
    assert InferenceSettings().vllm_max_lora_rank == 16


def test_vllm_cpu_loras_must_cover_gpu_loras() -> None:
    with pytest.raises(ValidationError, match=r"vllm_max_cpu_loras \(2\) must be >= "):
        InferenceSettings(vllm_max_loras=4, vllm_max_cpu_loras=2)
    assert InferenceSettings(vllm_max_loras=4, vllm_max_cpu_loras=4).vllm_max_cpu_loras == 4


def test_vllm_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValidationError, match="vllm_dtype"):
        InferenceSettings(vllm_dtype="fp16")
    assert InferenceSettings(vllm_dtype="bfloat16").vllm_dtype == "bfloat16"


class _Engine:
    def __init__(self) -> None:
        self.shut_down = threading.Event()

    def shutdown(self) -> None:
        self.shut_down.set()


async def test_the_engine_is_built_off_the_event_loop() -> None:
    release = threading.Event()
    engine = _Engine()

    def build() -> _Engine:
        release.wait(10)  # a blocking build: the loop must go on meanwhile
        return engine

    future = _in_daemon_thread(build)
    await asyncio.sleep(0.05)
    assert not future.done()  # the loop ran while the build blocks
    release.set()
    assert await future is engine
    assert not engine.shut_down.is_set()


async def test_an_engine_built_after_its_replica_gave_up_is_shut_down() -> None:
    release = threading.Event()
    engine = _Engine()

    def build() -> _Engine:
        release.wait(10)
        return engine

    future = _in_daemon_thread(build)
    future.cancel()  # the replica stopped during the build
    release.set()
    assert await asyncio.to_thread(engine.shut_down.wait, 10)


async def test_a_failed_build_raises_in_the_caller() -> None:
    def build() -> None:
        raise RuntimeError("engine core failed to start")

    with pytest.raises(RuntimeError, match="engine core failed"):
        await _in_daemon_thread(build)
