"""A finished job waits out a registry outage (UNAVAILABLE) instead of spending its
deliveries; other errors, a stop, or an outage past the window end the wait."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from ftops_runtime.errors import NotFound, Unavailable
from ftops_trainer.outage import through_registry_outage


def _rpc(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


def _flaky(failures: list[BaseException], value: str = "ok"):  # type: ignore[no-untyped-def]
    calls: list[float] = []

    async def call() -> str:
        calls.append(time.monotonic())
        if failures:
            raise failures.pop(0)
        return value

    return call, calls


async def test_retries_through_an_outage_until_the_registry_answers() -> None:
    call, calls = _flaky(
        [
            _rpc(grpc.StatusCode.UNAVAILABLE),
            Unavailable("db"),
            _rpc(grpc.StatusCode.DEADLINE_EXCEEDED),
        ]
    )
    got = await through_registry_outage("t", call, window_s=5, initial_delay_s=0.01)
    assert got == "ok"
    assert len(calls) == 4


async def test_other_errors_are_not_retried() -> None:
    call, calls = _flaky([_rpc(grpc.StatusCode.INVALID_ARGUMENT)])
    with pytest.raises(grpc.aio.AioRpcError):
        await through_registry_outage("t", call, window_s=5, initial_delay_s=0.01)
    call, calls = _flaky([NotFound("x")])
    with pytest.raises(NotFound):
        await through_registry_outage("t", call, window_s=5, initial_delay_s=0.01)
    assert len(calls) == 1


async def test_gives_up_after_the_window() -> None:
    call, calls = _flaky([_rpc(grpc.StatusCode.UNAVAILABLE)] * 1000)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await through_registry_outage("t", call, window_s=0.3, initial_delay_s=0.02)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert len(calls) >= 3


async def test_a_stop_ends_the_wait() -> None:
    stop = threading.Event()
    stop.set()
    call, calls = _flaky([_rpc(grpc.StatusCode.UNAVAILABLE)] * 10)
    with pytest.raises(grpc.aio.AioRpcError):
        await through_registry_outage("t", call, window_s=60, stop=stop, initial_delay_s=0.01)
    assert len(calls) == 1
