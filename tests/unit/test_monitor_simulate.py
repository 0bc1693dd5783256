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


async def test_mirrored_evidence_catches_a_failing_candidate_sooner_having_answered_fewer() -> None:
    plain = await simulate(Scenario(error_rate=0.3), runs=20, seed=3)
    mirrored = await simulate(Scenario(error_rate=0.3, evidence_mirror=20), runs=20, seed=3)
    assert mirrored["rolled_back"] >= 19
    assert mirrored["seconds_median"] < plain["seconds_median"]
    assert mirrored["candidate_requests_median"] < plain["candidate_requests_median"]
    assert mirrored["within_5s"] >= 0.9


def test_the_mirrored_share_follows_the_gateway_rule() -> None:
    assert Scenario(weight=5, evidence_mirror=20).mirrored_share() == 15 / 95
    assert Scenario(weight=25, evidence_mirror=20).mirrored_share() == 0.0
    assert Scenario(weight=5).mirrored_share() == 0.0
