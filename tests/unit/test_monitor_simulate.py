"""The whole monitor on simulated traffic (50 req/s, first step 5%): how fast bad
candidates are rolled back and that healthy ones pass."""

from __future__ import annotations

from ftops_monitor.simulate import Scenario, simulate


async def test_two_times_slower_candidate_rolled_back_within_5_s() -> None:
    result = await simulate(Scenario(slowdown=2.0), runs=10, seed=1)
    assert result["rolled_back"] == 10
    assert result["within_5s"] == 1.0


async def test_failing_candidate_rolled_back_after_a_dozen_requests() -> None:
    result = await simulate(Scenario(error_rate=0.3), runs=10, seed=1)
    assert result["rolled_back"] == 10
    assert result["candidate_requests_median"] <= 20


async def test_healthy_candidate_passes_its_step() -> None:
    result = await simulate(Scenario(error_rate=0.02, base_error_rate=0.02), runs=10, seed=1)
    assert (result["rolled_back"], result["promoted"]) == (0, 10)
