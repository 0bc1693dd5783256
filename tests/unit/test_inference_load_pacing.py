"""Background hot-loads yield to serving: pauses between their steps while requests are
in flight, none for a load a request waits for."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ftops_inference.loader import MAX_PAUSE_S, AdapterLoader, background_pause_s


def test_pause_makes_stepping_take_the_duty_cycle() -> None:
    assert background_pause_s(0.004, 0.25) == pytest.approx(0.012)  # 4 ms of 16
    assert background_pause_s(0.004, 0.5) == pytest.approx(0.004)
    assert background_pause_s(0.004, 1.0) == 0.0
    assert background_pause_s(0.0, 0.25) == 0.0
    assert background_pause_s(5.0, 0.25) == MAX_PAUSE_S  # a slow download is not tripled


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any, **kwargs: Any) -> Any:
        # Only the loader's pause is recorded (and skipped): other tasks of the session's
        # event loop still running sleep for real.
        if sys._getframe(1).f_code.co_name == "_pause":
            slept.append(seconds)
            return None
        return await real_sleep(seconds, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return slept


def _loader(*, busy: bool, duty: float = 0.25) -> AdapterLoader:
    return AdapterLoader(
        registry=None,  # type: ignore[arg-type]
        backend=None,  # type: ignore[arg-type]
        cache_dir=Path("/nonexistent"),
        base_fingerprint="fp",
        duty_cycle=duty,
        busy=lambda: busy,
    )


async def test_a_background_load_pauses_while_requests_are_served(pauses: list[float]) -> None:
    loader = _loader(busy=True)
    since = time.monotonic() - 0.01
    await loader._pause("ver_a", since)
    assert len(pauses) == 1
    assert pauses[0] >= 0.03 - 1e-6  # the step took at least 10 ms


async def test_no_pause_when_idle_urgent_or_unpaced(pauses: list[float]) -> None:
    since = time.monotonic() - 0.01
    await _loader(busy=False)._pause("ver_a", since)  # nothing being served
    await _loader(busy=True, duty=1.0)._pause("ver_a", since)  # pacing off
    urgent = _loader(busy=True)
    urgent._urgent.add("ver_a")  # a request waits for this load
    await urgent._pause("ver_a", since)
    assert pauses == []
