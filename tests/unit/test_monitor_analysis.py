"""The verdict on a release step (pure rule) and release state transitions."""

from __future__ import annotations

from typing import Any

import pytest

from ftops.events.v1 import events_pb2
from ftops_monitor.analysis import (
    Config,
    Decision,
    DecisionKind,
    Inconclusive,
    Release,
    ReleaseState,
    Strategy,
    decide,
    next_step,
)
from ftops_monitor.outcomes import Outcome, classify
from ftops_monitor.windows import Sample


def _release(step_index: int = 0, strategy: Strategy = Strategy.CANARY, **config: Any) -> Release:
    release = Release(
        release_id="rel_1",
        alias="bot",
        stable_version_id="ver_s",
        candidate_version_id="ver_c",
        steps=[5, 25, 50, 100],
        config=Config(**config),
        started_at=1000.0,
        strategy=strategy,
    )
    release.step_index = step_index
    release.weight = release.steps[step_index]
    return release


def _feed(release: Release, arm: str, n: int, *, errors: int = 0, latency: float = 100.0) -> None:
    data = release.candidate if arm == "candidate" else release.stable
    for i in range(n):
        # Spread latencies a little so rank tests see no wall of ties.
        data.add(Sample(at=1001.0, latency_ms=latency + i % 7, ok=i >= errors))


def _healthy(release: Release, n: int = 20, stable: int = 200) -> Release:
    _feed(release, "stable", stable)
    _feed(release, "candidate", n, latency=105.0)
    return release


def test_config_defaults_for_zero_settings() -> None:
    c = Config.from_proto(events_pb2.AnalysisSettings(auto=True))
    assert (c.min_requests, c.min_stable_requests, c.alpha) == (20, 20, 0.05)
    assert (c.latency_confidence, c.latency_effect, c.step_timeout_s) == (0.98, 0.2, 300.0)
    assert c.on_inconclusive is Inconclusive.ROLLBACK
    assert (c.min_feedback, c.max_feedback_drop, c.max_divergence) == (20, 0.1, 0.0)
    assert c.max_error_rate == 0.0
    custom = Config.from_proto(
        events_pb2.AnalysisSettings(
            min_requests=8,
            alpha=0.01,
            on_inconclusive=events_pb2.INCONCLUSIVE_ACTION_HOLD,
            min_stable_requests=50,
        )
    )
    assert (custom.min_requests, custom.min_stable_requests, custom.alpha) == (8, 50, 0.01)
    assert custom.on_inconclusive is Inconclusive.HOLD
    assert not custom.auto
    assert Strategy.from_proto(events_pb2.RELEASE_STRATEGY_SHADOW) is Strategy.SHADOW
    assert Strategy.from_proto(0) is Strategy.CANARY


def test_waits_for_minimum_samples_on_both_arms() -> None:
    release = _release()
    _feed(release, "candidate", 19)
    _feed(release, "stable", 200)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    assert decision.verdict == "inconclusive"
    assert "candidate 19/20" in decision.reason
    few_stable = _release()
    _feed(few_stable, "candidate", 30)
    _feed(few_stable, "stable", 10)
    assert decide(few_stable, 1002.0).kind is DecisionKind.WAIT


def test_promotes_healthy_candidate_step_by_step() -> None:
    decision = decide(_healthy(_release()), 1002.0)
    assert decision.kind is DecisionKind.PROMOTE
    assert decision.next is not None
    assert (decision.next.step_index, decision.next.weight, decision.next.final) == (1, 25, False)
    assert decision.figures["requests"] == 20
    assert decision.figures["stable_requests"] == 200
    assert decision.figures["stable_p95_ms"] > 0
    assert {c.name: c.status for c in decision.checks}["latency"] == "pass"
    last = decide(_healthy(_release(step_index=2)), 1002.0)
    assert last.next is not None
    assert (last.next.step_index, last.next.weight, last.next.final) == (3, 100, True)


def test_next_step_final_when_last_even_below_100_and_blue_green_at_once() -> None:
    release = _release()
    release.steps = [10, 40]
    step = next_step(release)
    assert (step.step_index, step.weight, step.final) == (1, 40, True)
    blue_green = _release(strategy=Strategy.BLUE_GREEN)
    step = next_step(blue_green)
    assert (step.weight, step.final) == (100, True)


def test_rolls_back_clear_error_regression_with_reasons_and_figures() -> None:
    release = _release()
    _feed(release, "stable", 400)
    _feed(release, "candidate", 15, errors=6)  # the step is not even at min_requests
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "error rate above stable" in decision.reason
    assert decision.figures["errors"] == 6
    assert decision.figures["errors_log_lr"] >= decision.figures["errors_log_threshold"]
    # One error in 20 against a clean stable: no rollback, but no pass on it either...
    unsure = _release()
    _feed(unsure, "stable", 400)
    _feed(unsure, "candidate", 20, errors=1)
    decision = decide(unsure, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    assert "leaning worse" in decision.reason
    # ... until more results show it was a one-off.
    _feed(unsure, "candidate", 20)
    assert decide(unsure, 1002.0).kind is DecisionKind.PROMOTE


def test_absolute_cap_fails_significant_excess_and_holds_back_a_marginal_one() -> None:
    release = _release(max_error_rate=0.05)
    _feed(release, "stable", 10)  # too little stable data for the two-sample test
    _feed(release, "candidate", 12, errors=5)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "cap" in decision.reason
    marginal = _release(max_error_rate=0.05)
    _feed(marginal, "stable", 400, errors=8)
    _feed(marginal, "candidate", 20, errors=2)  # 10% > 5%, not significant yet
    decision = decide(marginal, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    assert {c.name: c.status for c in decision.checks}["error_cap"] == "pending"


def test_two_times_slower_candidate_rolls_back_on_latency() -> None:
    release = _release()
    _feed(release, "stable", 200, latency=100.0)
    _feed(release, "candidate", 8, latency=200.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "latency worse at 98% confidence" in decision.reason
    assert decision.figures["latency_p_value"] < 0.02
    # 15% slower is within the allowed 20%.
    fine = _release()
    _feed(fine, "stable", 200, latency=100.0)
    _feed(fine, "candidate", 20, latency=115.0)
    assert decide(fine, 1002.0).kind is DecisionKind.PROMOTE


def test_legacy_latency_ratio_guard() -> None:
    release = _release(max_latency_ratio=1.1, latency_effect=5.0)
    _feed(release, "stable", 200, latency=100.0)
    _feed(release, "candidate", 20, latency=150.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "p95" in decision.reason


def _scores(release: Release, arm: str, n: int, score: float) -> None:
    data = release.candidate if arm == "candidate" else release.stable
    for i in range(n):
        data.feedback.put(f"{arm}-{i}", score, 1001.0)


def test_feedback_drop_fails_only_with_enough_scores() -> None:
    release = _healthy(_release(min_feedback=5))
    _scores(release, "stable", 5, 0.9)
    _scores(release, "candidate", 4, 0.2)
    assert decide(release, 1002.0).kind is DecisionKind.PROMOTE  # 4 < 5 scores: not counted
    release.candidate.feedback.put("candidate-9", 0.2, 1001.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "mean score 0.200" in decision.reason
    assert decision.figures["feedback_mean"] == pytest.approx(0.2)
    close = _healthy(_release(min_feedback=5))
    _scores(close, "stable", 5, 0.9)
    _scores(close, "candidate", 5, 0.85)
    assert decide(close, 1002.0).kind is DecisionKind.PROMOTE


def test_shadow_strategy_reports_and_divergence_fails() -> None:
    release = _healthy(_release(strategy=Strategy.SHADOW, max_divergence=0.3))
    decision = decide(release, 1002.0)
    # Healthy but no divergence figures yet: divergence pending does not block reporting.
    assert decision.kind is DecisionKind.REPORT
    diverging = _release(strategy=Strategy.SHADOW, max_divergence=0.3)
    _feed(diverging, "stable", 100)
    for i in range(20):
        diverging.candidate.add(Sample(at=1001.0, latency_ms=100.0 + i, ok=True, divergence=0.6))
    decision = decide(diverging, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "divergence" in decision.reason


def test_evaluation_refusal_fails_the_release() -> None:
    release = _healthy(_release())
    release.evaluation_failure = "registry evaluation refused the candidate: retention 0.2"
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "retention 0.2" in decision.reason


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        (Inconclusive.ROLLBACK, DecisionKind.ROLLBACK),
        (Inconclusive.PROMOTE, DecisionKind.PROMOTE),
        (Inconclusive.HOLD, DecisionKind.WAIT),
    ],
)
def test_inconclusive_step_at_its_time_limit(action: Inconclusive, kind: DecisionKind) -> None:
    release = _release(step_timeout_s=60, on_inconclusive=action)
    _feed(release, "candidate", 3)
    assert decide(release, 1059.0).kind is DecisionKind.WAIT
    decision = decide(release, 1060.0)
    assert decision.kind is kind
    assert "inconclusive after 60 s" in decision.reason


def test_shadow_never_promotes_even_when_told_to_on_timeout() -> None:
    release = _release(
        strategy=Strategy.SHADOW, step_timeout_s=1, on_inconclusive=Inconclusive.PROMOTE
    )
    assert decide(release, 2000.0).kind is DecisionKind.WAIT


def test_release_follows_the_gateways_state() -> None:
    release = _healthy(_release())

    def follow(revision: int, **kw: Any) -> bool:
        state = kw.pop("state", ReleaseState.RUNNING)
        return release.follow(
            revision,
            state,
            paused=kw.get("paused", False),
            step_index=kw.get("step_index", release.step_index),
            weight=kw.get("weight", release.weight),
            step_started_at=kw.get("at", release.step_started_at),
        )

    assert not follow(1)  # the same state: nothing changes
    assert follow(2, step_index=1, weight=25, at=1003.0)
    assert (release.candidate.requests, release.step_started_at) == (0, 1003.0)
    assert not follow(2, step_index=0, weight=5, at=1001.0)  # a stale revision
    assert (release.step_index, release.weight) == (1, 25)
    # Paused: results are no evidence; the resume starts the step over.
    assert follow(3, paused=True)
    assert not release.in_step(1011.0)
    assert follow(4, paused=False, at=1020.0)
    assert release.step_started_at == 1020.0
    assert release.in_step(1021.0)
    release.pending_decision = "d1"
    assert follow(5, state=ReleaseState.ROLLED_BACK, weight=0)
    assert (release.state, release.weight, release.pending_decision) == (
        ReleaseState.ROLLED_BACK,
        0,
        "",
    )
    assert not release.in_step(1030.0)


# -- failures that are not the candidate's (issue 13) ---------------------------------


def _outcomes(
    release: Release,
    arm: str,
    n: int,
    outcome: Outcome,
    *,
    mirrored: bool = False,
    latency: float = 100.0,
) -> None:
    data = release.candidate if arm == "candidate" else release.stable
    for i in range(n):
        sample = Sample(at=1001.0, latency_ms=latency + i % 7, ok=outcome is Outcome.OK)
        data.add(sample, mirrored=mirrored, outcome=outcome)


def _statuses(decision: Decision) -> dict[str, str]:
    return {c.name: c.status for c in decision.checks}


@pytest.mark.parametrize(
    ("status", "origin", "outcome"),
    [
        ("OK", "", Outcome.OK),
        ("INVALID_ARGUMENT", "replica", Outcome.CLIENT),  # a client fault whatever the origin
        ("CANCELLED", "", Outcome.CLIENT),
        ("RESOURCE_EXHAUSTED", "", Outcome.CAPACITY),  # older gateways: the status says it
        ("UNAVAILABLE", "", Outcome.TRANSPORT),
        ("DEADLINE_EXCEEDED", "", Outcome.DEADLINE),
        ("INTERNAL", "", Outcome.REPLICA),
        ("UNAVAILABLE", "replica", Outcome.REPLICA),  # the origin wins over the status
        ("RESOURCE_EXHAUSTED", "capacity", Outcome.CAPACITY),
        ("INTERNAL", "transport", Outcome.TRANSPORT),
        ("UNAVAILABLE", "deadline", Outcome.DEADLINE),
        ("RESOURCE_EXHAUSTED", "from-the-future", Outcome.CAPACITY),  # unknown: the status
    ],
)
def test_results_are_classified_by_where_they_failed(
    status: str, origin: str, outcome: Outcome
) -> None:
    assert classify(status, origin) is outcome


def test_both_arms_over_the_cap_hold_the_step_instead_of_rolling_back() -> None:
    # The figures: a failure mode both arms show, far over the 5% cap.
    release = _release(max_error_rate=0.05, step_timeout_s=60)
    _feed(release, "stable", 64, errors=40)
    _feed(release, "candidate", 16, errors=10)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    assert decision.verdict == "inconclusive"
    assert decision.reason.startswith("release held")
    assert _statuses(decision)["error_cap"] == "pending"
    assert "both arms failing over the cap" in decision.reason
    [hold] = decision.held
    assert (hold.check, hold.threshold) == ("error_cap", 0.05)
    assert hold.value == pytest.approx(40 / 64)
    # A held step is not the candidate's doing: the time limit's rollback does not apply.
    assert decide(release, 1100.0).kind is DecisionKind.WAIT
    # The same candidate against a healthy stable is rolled back at once.
    alone = _release(max_error_rate=0.05)
    _feed(alone, "stable", 64)
    _feed(alone, "candidate", 16, errors=10)
    assert decide(alone, 1002.0).kind is DecisionKind.ROLLBACK


def test_a_candidate_worse_than_a_failing_stable_is_still_rolled_back() -> None:
    release = _release(max_error_rate=0.05)
    _feed(release, "stable", 200, errors=20)  # 10%: over the cap itself
    _feed(release, "candidate", 20, errors=12)  # 60%
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "error rate above stable" in decision.reason


def test_capacity_refusals_on_both_arms_hold_and_count_as_no_errors() -> None:
    release = _release(max_error_rate=0.05, step_timeout_s=60)
    _outcomes(release, "stable", 30, Outcome.OK)
    _outcomes(release, "stable", 38, Outcome.CAPACITY, latency=1.0)
    _outcomes(release, "candidate", 20, Outcome.OK, latency=105.0)
    _outcomes(release, "candidate", 10, Outcome.CAPACITY, latency=1.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    assert decision.verdict == "inconclusive"
    assert decision.reason.startswith("release held")
    checks = _statuses(decision)
    assert checks["infrastructure"] == "pending"
    assert (checks["errors"], checks["error_cap"], checks["samples"]) == ("pass", "pass", "pass")
    assert "infrastructure failures above 5% of the step's" in decision.reason
    assert "38 capacity" in decision.reason
    f = decision.figures
    assert (f["errors"], f["requests"], f["stable_errors"], f["stable_requests"]) == (0, 20, 0, 30)
    assert (f["infra_errors"], f["stable_infra_errors"]) == (10, 38)
    assert f["stable_infra_rate"] == pytest.approx(38 / 68)
    # Refusals answer in a millisecond: they are no latency sample either.
    assert f["stable_p50_ms"] > 50
    [hold] = decision.held
    # The hold looks at the latest results (12 ok and 38 refused of the stable arm's last 50).
    assert (hold.check, hold.value, hold.threshold) == ("infrastructure", 38 / 50, 0.05)
    assert decide(release, 1100.0).kind is DecisionKind.WAIT  # held past the time limit


def test_the_hold_clears_once_the_latest_results_are_clean() -> None:
    release = _release(max_error_rate=0.05, step_timeout_s=600)
    _outcomes(release, "stable", 40, Outcome.TRANSPORT, latency=1.0)  # an outage, then back
    _outcomes(release, "candidate", 8, Outcome.TRANSPORT, latency=1.0)
    assert decide(release, 1002.0).reason.startswith("release held")
    _outcomes(release, "stable", 50, Outcome.OK)
    _outcomes(release, "candidate", 50, Outcome.OK)
    # Over the whole step 40 of 90 stable results failed: diluting that below 5% would
    # take 800 more results; the latest 50 are clean, so the step goes on now.
    assert decide(release, 1003.0).kind is DecisionKind.PROMOTE


def test_a_few_infrastructure_failures_hold_nothing() -> None:
    release = _healthy(_release(max_error_rate=0.05))
    _outcomes(release, "stable", 5, Outcome.TRANSPORT)  # 5 of 205: under 5%
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.PROMOTE
    assert _statuses(decision)["infrastructure"] == "pass"


def test_capacity_refusals_of_mirrored_requests_are_ignored() -> None:
    release = _release(strategy=Strategy.BLUE_GREEN, max_error_rate=0.05)
    _feed(release, "stable", 200)
    _outcomes(release, "candidate", 20, Outcome.OK, mirrored=True, latency=105.0)
    _outcomes(release, "candidate", 30, Outcome.CAPACITY, mirrored=True, latency=1.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.PROMOTE
    assert (decision.figures["errors"], decision.figures["mirror_refused"]) == (0, 30)
    assert decision.figures["infra_errors"] == 0


def test_a_thirty_percent_failing_candidate_is_rolled_back_through_a_burst() -> None:
    release = _release(max_error_rate=0.05)
    _outcomes(release, "stable", 60, Outcome.OK)
    _outcomes(release, "stable", 40, Outcome.CAPACITY)  # both arms refused for load
    _outcomes(release, "candidate", 10, Outcome.CAPACITY)
    _feed(release, "candidate", 20, errors=6)  # and the candidate's own 30%
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "candidate 6/20 errors" in decision.reason
    assert (decision.figures["errors"], decision.figures["infra_errors"]) == (6, 10)


def test_a_two_times_slower_candidate_is_rolled_back_on_latency_through_a_burst() -> None:
    release = _release(max_error_rate=0.05)
    _outcomes(release, "stable", 60, Outcome.OK, latency=100.0)
    _outcomes(release, "stable", 40, Outcome.CAPACITY, latency=1.0)
    _outcomes(release, "candidate", 8, Outcome.OK, latency=200.0)
    _outcomes(release, "candidate", 8, Outcome.CAPACITY, latency=1.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "latency worse" in decision.reason
    assert "error rate" not in decision.reason


def test_overload_latency_on_both_arms_is_not_the_candidates() -> None:
    release = _release(max_error_rate=0.05)
    _outcomes(release, "stable", 200, Outcome.OK, latency=900.0)  # both queueing
    _outcomes(release, "candidate", 20, Outcome.OK, latency=950.0)
    _outcomes(release, "stable", 4, Outcome.DEADLINE, latency=2000.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.PROMOTE
    assert _statuses(decision)["latency"] == "pass"


def test_deadlines_only_on_the_candidate_are_its_own() -> None:
    release = _release(max_error_rate=0.05)
    _outcomes(release, "stable", 200, Outcome.OK)
    _outcomes(release, "candidate", 14, Outcome.OK, latency=105.0)
    _outcomes(release, "candidate", 6, Outcome.DEADLINE, latency=5000.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.ROLLBACK
    assert "deadline exceeded more than stable" in decision.reason
    assert "candidate 6/20 past the deadline" in decision.reason
    assert (decision.figures["deadlines"], decision.figures["stable_deadlines"]) == (6, 0)


def test_deadlines_on_both_arms_alike_are_load_not_the_candidate() -> None:
    release = _release(max_error_rate=0.05)
    _outcomes(release, "stable", 160, Outcome.OK)
    _outcomes(release, "stable", 40, Outcome.DEADLINE, latency=5000.0)
    _outcomes(release, "candidate", 16, Outcome.OK, latency=105.0)
    _outcomes(release, "candidate", 4, Outcome.DEADLINE, latency=5000.0)
    decision = decide(release, 1002.0)
    assert decision.kind is DecisionKind.WAIT
    checks = _statuses(decision)
    assert (checks["deadlines"], checks["infrastructure"]) == ("pass", "pending")
    assert decision.verdict == "inconclusive"
    assert decision.reason.startswith("release held")
