"""Release state and the verdict on its current step. Pure Python, unit-tested.

The candidate is judged against the stable version over the same period: the results of
both since the current step began (for blue-green and shadow, the candidate's mirrored
"shadow" results; for canary, its own requests plus the stable requests mirrored to it as
evidence while a small step runs). Checks, each able to fail the step at any moment:

  * evaluation: the registry's evaluation of the candidate refused it;
  * errors: always-valid sequential test, candidate error rate above the stable's (alpha);
  * error_cap: always-valid test of the candidate error rate above ``max_error_rate``;
  * latency: one-sided Mann-Whitney U of the candidate against stable x (1 + effect);
  * latency_ratio: candidate p95 above ``max_latency_ratio`` x stable p95 (legacy guard);
  * feedback: candidate mean score more than ``max_feedback_drop`` below the stable's;
  * divergence: mean shadow divergence above ``max_divergence``;
  * deadlines: the candidate past the gateway's deadline significantly more than stable.

Only the version's own failures count as errors (``outcomes.classify``); capacity
refusals, transport failures and deadlines are infrastructure outcomes, left out of error
rates and latencies. Two things **hold** a step instead of failing it: both arms over the
error cap (error_cap), and infrastructure outcomes above ``max_infra_rate`` of either arm's
results (infrastructure). A held step gets no automatic decision, not even at its time
limit, except a rollback for a failed check; the monitor raises an alert.

A step passes once both arms have their minimum results, no check failed or holds and the
observed error rate is within the cap. Until then it is inconclusive; at ``step_timeout_s``
the release's ``on_inconclusive`` action applies. Details and defaults: docs/analysis.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ftops.events.v1 import events_pb2
from ftops_monitor.outcomes import Outcome
from ftops_monitor.stats import (
    compare_error_rates,
    exceeds_rate,
    leans_worse,
    mann_whitney_greater,
)
from ftops_monitor.windows import FeedbackScores, Figures, Sample, figures

# Latency comparisons need a few successful results per arm before they mean anything.
MIN_LATENCY_SAMPLES = 5
# Per arm, the latest results the infrastructure hold looks at.
RECENT_RESULTS = 50
# Infrastructure outcomes (capacity, transport, deadline) above this share of an arm's
# results in the step hold it: too much of the traffic never reached a verdict on the
# version, and the operator should see why (an alert is raised; it never rolls back).
MAX_INFRA_RATE = 0.05
# Per arm and step, the latest results kept for latency figures and Mann-Whitney (the
# error counts cover all). The test's power comes from the smaller arm, the candidate's;
# a bigger stable sample would only make every analysis slower.
MAX_STEP_SAMPLES = 2_000


class ReleaseState(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    # SetRoute sent all traffic elsewhere while the release ran.
    REPLACED = "replaced"

    @classmethod
    def of_snapshot(cls, state: str) -> ReleaseState:
        """The gateway's state name; "paused" is a running release that is paused."""
        if state == "paused":
            return cls.RUNNING
        try:
            return cls(state)
        except ValueError:
            return cls.RUNNING


class Strategy(StrEnum):
    CANARY = "canary"
    BLUE_GREEN = "blue_green"
    SHADOW = "shadow"

    @classmethod
    def from_proto(cls, value: int) -> Strategy:
        if value == events_pb2.RELEASE_STRATEGY_BLUE_GREEN:
            return cls.BLUE_GREEN
        if value == events_pb2.RELEASE_STRATEGY_SHADOW:
            return cls.SHADOW
        return cls.CANARY

    @property
    def judges_shadow(self) -> bool:
        """Blue-green and shadow judge the candidate on mirrored traffic."""
        return self is not Strategy.CANARY


class Inconclusive(StrEnum):
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    HOLD = "hold"

    @classmethod
    def from_proto(cls, value: int) -> Inconclusive:
        if value == events_pb2.INCONCLUSIVE_ACTION_PROMOTE:
            return cls.PROMOTE
        if value == events_pb2.INCONCLUSIVE_ACTION_HOLD:
            return cls.HOLD
        return cls.ROLLBACK


class DecisionKind(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"
    # Shadow releases never promote: a passing step is reported, not acted on.
    REPORT = "report"


@dataclass(frozen=True)
class Config:
    """One release's analysis settings with the defaults resolved (0 = default)."""

    min_requests: int = 20
    min_stable_requests: int = 20
    max_error_rate: float = 0.0  # 0 = no absolute cap
    max_latency_ratio: float = 0.0  # 0 = off
    auto: bool = True
    alpha: float = 0.05
    latency_confidence: float = 0.98
    latency_effect: float = 0.2
    step_timeout_s: float = 300.0
    on_inconclusive: Inconclusive = Inconclusive.ROLLBACK
    min_feedback: int = 20
    max_feedback_drop: float = 0.1
    max_divergence: float = 0.0  # 0 = off
    # Not in AnalysisSettings: the monitor's own bar for holding a step (MAX_INFRA_RATE).
    max_infra_rate: float = MAX_INFRA_RATE

    @classmethod
    def from_proto(cls, a: events_pb2.AnalysisSettings) -> Config:
        d = cls()
        min_requests = a.min_requests or d.min_requests
        return cls(
            min_requests=min_requests,
            # Unset: as many stable results as candidate ones (stable traffic is plentiful).
            min_stable_requests=a.min_stable_requests or min_requests,
            max_error_rate=a.max_error_rate,
            max_latency_ratio=a.max_latency_ratio,
            auto=a.auto,
            alpha=a.alpha if 0 < a.alpha < 1 else d.alpha,
            latency_confidence=(
                a.latency_confidence if 0 < a.latency_confidence < 1 else d.latency_confidence
            ),
            latency_effect=a.latency_effect if a.latency_effect > 0 else d.latency_effect,
            step_timeout_s=a.step_timeout_s if a.step_timeout_s > 0 else d.step_timeout_s,
            on_inconclusive=Inconclusive.from_proto(a.on_inconclusive),
            min_feedback=a.min_feedback or d.min_feedback,
            max_feedback_drop=(
                a.max_feedback_drop if a.max_feedback_drop > 0 else d.max_feedback_drop
            ),
            max_divergence=a.max_divergence,
        )


class ArmData:
    """One arm's results and feedback since the step began: running counts for the error
    tests, latencies for Mann-Whitney (bounded).

    ``requests`` and ``errors`` cover what the version did itself (successes and its own
    failures); infrastructure outcomes (capacity refusals, transport failures, the
    gateway's deadline) are counted apart: they are no evidence of the version's error
    rate or latency, but too many of them hold the step (``_Judge.infrastructure``)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        # Of ``requests``, results of mirrored requests (answered to nobody).
        self.mirrored = 0
        self.capacity = 0
        self.transport = 0
        self.deadlines = 0
        # Mirrored requests the candidate refused for load: the mirror is best-effort load
        # on top of its share, so these say nothing and hold nothing (shown, not counted).
        self.mirror_refused = 0
        # Whether each of the latest results was an infrastructure outcome: the hold looks
        # at these, so it clears soon after an outage ends instead of waiting until the
        # outage's failures are diluted below the limit over the whole step.
        self.recent: deque[bool] = deque(maxlen=RECENT_RESULTS)
        self.samples: deque[Sample] = deque(maxlen=MAX_STEP_SAMPLES)
        self.feedback = FeedbackScores()

    def add(
        self, sample: Sample, *, mirrored: bool = False, outcome: Outcome | None = None
    ) -> None:
        """Counts one result; ``outcome`` defaults to ok / the version's own failure."""
        if outcome is None:
            outcome = Outcome.OK if sample.ok else Outcome.REPLICA
        if outcome is not Outcome.CLIENT and not (outcome is Outcome.CAPACITY and mirrored):
            self.recent.append(outcome in _INFRA_OUTCOMES)
        if outcome is Outcome.CAPACITY:
            if mirrored:
                self.mirror_refused += 1
            else:
                self.capacity += 1
        elif outcome is Outcome.TRANSPORT:
            self.transport += 1
        elif outcome is Outcome.DEADLINE:
            self.deadlines += 1
        elif outcome is not Outcome.CLIENT:
            self.requests += 1
            self.mirrored += 1 if mirrored else 0
            self.errors += 0 if outcome is Outcome.OK else 1
            self.samples.append(sample)

    @property
    def infra_errors(self) -> int:
        return self.capacity + self.transport + self.deadlines

    @property
    def results(self) -> int:
        """Every counted result, infrastructure outcomes included."""
        return self.requests + self.infra_errors

    @property
    def infra_rate(self) -> float:
        return self.infra_errors / self.results if self.results else 0.0

    @property
    def recent_infra_rate(self) -> float:
        """Infrastructure share of the latest RECENT_RESULTS results."""
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def attempted(self) -> int:
        """Results the version worked on (not refused, reached): the deadline rate's base."""
        return self.requests + self.deadlines

    def latencies(self) -> list[float]:
        return [s.latency_ms for s in self.samples if s.ok]

    def figures(self) -> Figures:
        f = figures(self.samples, self.feedback.scores())
        # The counts cover every result even when the sample buffer is full.
        return replace(
            f,
            requests=self.requests,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else 0.0,
        )


@dataclass
class Release:
    """The monitor's view of one release: its state as the gateway last published it
    (``route.changed``; the gateway is the only writer of release state) and the evidence
    gathered for the current step."""

    release_id: str
    alias: str
    stable_version_id: str
    candidate_version_id: str
    steps: list[int]
    config: Config
    started_at: float
    strategy: Strategy = Strategy.CANARY
    step_index: int = 0
    weight: int = 0
    state: ReleaseState = ReleaseState.RUNNING
    paused: bool = False
    step_started_at: float = 0.0
    # The route revision this state comes from: an older snapshot arriving late is stale.
    revision: int = 0
    # The id of the decision published for the current step, until the gateway's next
    # snapshot shows it applied (or ignored): the step is not judged again meanwhile.
    pending_decision: str = ""
    pending_since: float = 0.0
    candidate: ArmData = field(default_factory=ArmData)
    stable: ArmData = field(default_factory=ArmData)
    # Set once the registry's evaluation of the candidate is known to refuse it.
    evaluation_failure: str = ""
    evaluation_figures: dict[str, float] = field(default_factory=dict)
    last_decision: str = ""
    last_reason: str = ""

    def __post_init__(self) -> None:
        if not self.weight and self.steps:
            self.weight = self.steps[0]
        if not self.step_started_at:
            self.step_started_at = self.started_at

    @property
    def running(self) -> bool:
        return self.state is ReleaseState.RUNNING

    @property
    def mirrored_evidence(self) -> int:
        """Of a canary's candidate results this step, those of mirrored requests (blue-green
        and shadow judge mirrored results only, so there it says nothing)."""
        return 0 if self.strategy.judges_shadow else self.candidate.mirrored

    def in_step(self, at: float) -> bool:
        """Whether a result that finished at ``at`` is evidence for the current step."""
        return self.running and not self.paused and at >= self.step_started_at

    def restart_step(self, at: float) -> None:
        self.candidate = ArmData()
        self.stable = ArmData()
        self.step_started_at = max(at, self.step_started_at)

    def follow(
        self,
        revision: int,
        state: ReleaseState,
        *,
        paused: bool,
        step_index: int,
        weight: int,
        step_started_at: float,
    ) -> bool:
        """Take the gateway's state at ``revision``; False when it is stale or changes
        nothing the analysis depends on. A new step (a promotion, a resume) starts its
        evidence over; whatever decision was pending is settled by this state."""
        if revision <= self.revision:
            return False
        self.revision = revision
        changed = (state, paused, step_index, weight) != (
            self.state,
            self.paused,
            self.step_index,
            self.weight,
        ) or step_started_at > self.step_started_at
        if not changed:
            return False
        self.state, self.paused = state, paused
        self.step_index, self.weight = step_index, weight
        if step_started_at > self.step_started_at:
            self.restart_step(step_started_at)
        self.pending_decision, self.pending_since = "", 0.0
        return True


@dataclass(frozen=True)
class NextStep:
    step_index: int
    weight: int
    final: bool


def next_step(release: Release) -> NextStep:
    if release.strategy is Strategy.BLUE_GREEN:
        # Checked on mirrored traffic, then all traffic at once.
        return NextStep(max(len(release.steps) - 1, release.step_index), 100, True)
    following = release.step_index + 1
    if following >= len(release.steps):
        return NextStep(release.step_index, 100, True)
    weight = release.steps[following]
    return NextStep(following, weight, weight >= 100 or following == len(release.steps) - 1)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass", "fail", "pending", "off"
    detail: str


@dataclass(frozen=True)
class Hold:
    """A check holding the step: ``value`` is above ``threshold`` on an arm, and that is
    not the candidate's fault."""

    check: str
    detail: str
    value: float
    threshold: float


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str
    figures: dict[str, float]
    next: NextStep | None = None
    checks: tuple[Check, ...] = ()
    verdict: str = ""
    # Why the step is held (failures that are not the candidate's): no automatic decision
    # but a rollback for the candidate's own failures, and an alert (monitor.py).
    held: tuple[Hold, ...] = ()


def arm_figures(candidate: Figures, stable: Figures | None) -> dict[str, float]:
    out = {
        "requests": float(candidate.requests),
        "errors": float(candidate.errors),
        "error_rate": candidate.error_rate,
        "p50_ms": candidate.latency_p50_ms,
        "p95_ms": candidate.latency_p95_ms,
        "p99_ms": candidate.latency_p99_ms,
    }
    if candidate.feedback_count:
        out["feedback_count"] = float(candidate.feedback_count)
        out["feedback_mean"] = candidate.feedback_mean
    if candidate.divergence_count:
        out["divergence_mean"] = candidate.divergence_mean
    if stable is not None and stable.requests:
        out["stable_requests"] = float(stable.requests)
        out["stable_errors"] = float(stable.errors)
        out["stable_error_rate"] = stable.error_rate
    if stable is not None and stable.ok_requests:
        out["stable_p50_ms"] = stable.latency_p50_ms
        out["stable_p95_ms"] = stable.latency_p95_ms
    if stable is not None and stable.feedback_count:
        out["stable_feedback_count"] = float(stable.feedback_count)
        out["stable_feedback_mean"] = stable.feedback_mean
    return out


class _Judge:
    """Runs the checks of one release at one moment and collects figures and reasons."""

    def __init__(self, release: Release, now: float) -> None:
        self.release = release
        self.config = release.config
        self.now = now
        self.cand = release.candidate.figures()
        self.stab = release.stable.figures()
        self.numbers = arm_figures(self.cand, self.stab)
        self.numbers["weight"] = float(release.weight)
        self.numbers["min_requests"] = float(self.config.min_requests)
        self.numbers["step_seconds"] = max(0.0, now - release.step_started_at)
        if release.mirrored_evidence:
            self.numbers["mirrored_requests"] = float(release.mirrored_evidence)
        self._infra_figures()
        if release.evaluation_failure:
            # Only a refusal puts the (many) evaluation metrics into the decision's figures;
            # GetReleaseAnalysis shows them always.
            self.numbers.update(release.evaluation_figures)
        self.checks: list[Check] = []
        self.failures: list[str] = []
        self.holds: list[Hold] = []

    def _add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))
        if status == "fail":
            self.failures.append(detail)

    def _hold(self, name: str, detail: str, value: float, threshold: float) -> None:
        """A blocking pending check that no timeout turns into a decision."""
        self._add(name, "pending", detail)
        self.holds.append(Hold(name, detail, value, threshold))

    def _infra_figures(self) -> None:
        c, s = self.release.candidate, self.release.stable
        self.numbers["infra_errors"] = float(c.infra_errors)
        self.numbers["infra_rate"] = c.infra_rate
        self.numbers["stable_infra_errors"] = float(s.infra_errors)
        self.numbers["stable_infra_rate"] = s.infra_rate
        if c.deadlines or s.deadlines:
            self.numbers["deadlines"] = float(c.deadlines)
            self.numbers["stable_deadlines"] = float(s.deadlines)
        if c.mirror_refused:
            self.numbers["mirror_refused"] = float(c.mirror_refused)

    def evaluation(self) -> None:
        if self.release.evaluation_failure:
            self._add("evaluation", "fail", self.release.evaluation_failure)
        elif self.release.evaluation_figures:
            self._add("evaluation", "pass", "registry evaluation passed")

    def errors(self) -> None:
        c, s, alpha = self.cand, self.stab, self.config.alpha
        if not c.requests or not s.requests:
            self._add("errors", "pending", "no results on one of the arms yet")
            return
        test = compare_error_rates(c.errors, c.requests, s.errors, s.requests, alpha)
        self.numbers["errors_log_lr"] = test.log_lr
        self.numbers["errors_log_threshold"] = test.log_threshold
        self.numbers["stable_error_upper"] = test.bound
        what = (
            f"candidate {c.errors}/{c.requests} errors ({c.error_rate:.1%}) vs stable "
            f"{s.errors}/{s.requests} ({s.error_rate:.1%}, upper bound {test.bound:.1%})"
        )
        if test.rejected:
            self._add("errors", "fail", f"error rate above stable at alpha {alpha:g}: {what}")
        elif leans_worse(c.errors, c.requests, s.errors, s.requests):
            # Not significant yet, but the data favour "worse than stable": a step must not
            # pass on it (2 errors in 20 against a clean stable is no pass).
            self._add("errors", "pending", f"leaning worse than stable: {what}")
        else:
            self._add("errors", "pass", what)

    def error_cap(self) -> None:
        cap, c = self.config.max_error_rate, self.cand
        if cap <= 0:
            self._add("error_cap", "off", "no absolute error-rate cap")
            return
        test = exceeds_rate(c.errors, c.requests, cap, self.config.alpha)
        self.numbers["cap_log_lr"] = test.log_lr
        what = f"candidate {c.errors}/{c.requests} errors ({c.error_rate:.1%}), cap {cap:.1%}"
        s = self.stab
        if test.rejected and s.requests and s.error_rate > cap:
            # Stable fails as often: a failure mode of the platform or of both versions,
            # not the candidate's (the errors check still fails a candidate worse than
            # stable). Rolling back would not help; an operator should look.
            self._hold(
                "error_cap",
                f"release held, both arms failing over the cap: {what}, stable "
                f"{s.errors}/{s.requests} ({s.error_rate:.1%})",
                s.error_rate,
                cap,
            )
        elif test.rejected:
            self._add("error_cap", "fail", f"error rate above the cap: {what}")
        elif c.requests and c.error_rate > cap:
            self._add("error_cap", "pending", f"above the cap, not yet significant: {what}")
        else:
            self._add("error_cap", "pass", what)

    def deadlines(self) -> None:
        """Deadlines count against the candidate only when it shows significantly more of
        them than stable (the errors check's test): both arms timing out alike is load."""
        c, s, alpha = self.release.candidate, self.release.stable, self.config.alpha
        if not c.deadlines:
            return
        if not s.attempted:
            self._add("deadlines", "pending", "no stable results to compare deadlines with")
            return
        test = compare_error_rates(c.deadlines, c.attempted, s.deadlines, s.attempted, alpha)
        self.numbers["deadlines_log_lr"] = test.log_lr
        what = (
            f"candidate {c.deadlines}/{c.attempted} past the deadline "
            f"({c.deadlines / c.attempted:.1%}) vs stable {s.deadlines}/{s.attempted} "
            f"({s.deadlines / s.attempted:.1%}, upper bound {test.bound:.1%})"
        )
        if test.rejected:
            self._add(
                "deadlines",
                "fail",
                f"deadline exceeded more than stable at alpha {alpha:g}: {what}",
            )
        else:
            self._add("deadlines", "pass", what)

    def infrastructure(self) -> None:
        """Holds the step while either arm has too many results that are no evidence."""
        limit = self.config.max_infra_rate
        arms = (("candidate", self.release.candidate), ("stable", self.release.stable))
        what = ", ".join(f"{name} {_infra_text(arm)}" for name, arm in arms)
        # Over the limit in the step *and* lately: an outage holds the step while it lasts
        # and stops holding it soon after it ends.
        over = [
            name for name, arm in arms if arm.infra_rate > limit and arm.recent_infra_rate > limit
        ]
        if over:
            self._hold(
                "infrastructure",
                f"release held, infrastructure failures above {limit:.0%} of the step's and "
                f"of the latest {RECENT_RESULTS} results on {' and '.join(over)} (not the "
                f"candidate's): {what}",
                max(arm.recent_infra_rate for _, arm in arms),
                limit,
            )
        else:
            self._add("infrastructure", "pass", what)

    def latency(self) -> None:
        config = self.config
        cand_lat = self.release.candidate.latencies()
        stab_lat = self.release.stable.latencies()
        if len(cand_lat) < MIN_LATENCY_SAMPLES or len(stab_lat) < MIN_LATENCY_SAMPLES:
            self._add("latency", "pending", "too few successful results to compare")
        else:
            test = mann_whitney_greater(cand_lat, stab_lat, scale=1 + config.latency_effect)
            self.numbers["latency_z"] = test.z
            self.numbers["latency_p_value"] = test.p_value
            what = (
                f"candidate p50 {self.cand.latency_p50_ms:.1f} ms vs stable p50 "
                f"{self.stab.latency_p50_ms:.1f} ms x {1 + config.latency_effect:g} "
                f"(Mann-Whitney p={test.p_value:.4f})"
            )
            if test.p_value < 1 - config.latency_confidence:
                self._add(
                    "latency",
                    "fail",
                    f"latency worse at {config.latency_confidence:.0%} confidence: {what}",
                )
            else:
                self._add("latency", "pass", what)
        ratio = config.max_latency_ratio
        if ratio > 0 and self.cand.ok_requests >= config.min_requests and self.stab.ok_requests:
            limit = ratio * self.stab.latency_p95_ms
            what = (
                f"candidate p95 {self.cand.latency_p95_ms:.1f} ms vs {ratio:g} x stable p95 "
                f"{self.stab.latency_p95_ms:.1f} ms"
            )
            self._add("latency_ratio", "fail" if self.cand.latency_p95_ms > limit else "pass", what)

    def feedback(self) -> None:
        config, c, s = self.config, self.cand, self.stab
        if min(c.feedback_count, s.feedback_count) < config.min_feedback:
            self._add(
                "feedback",
                "pending",
                f"{c.feedback_count} candidate / {s.feedback_count} stable scores "
                f"({config.min_feedback} needed on each)",
            )
            return
        what = (
            f"candidate mean score {c.feedback_mean:.3f} ({c.feedback_count}) vs stable "
            f"{s.feedback_mean:.3f} ({s.feedback_count}), allowed drop {config.max_feedback_drop:g}"
        )
        dropped = c.feedback_mean < s.feedback_mean - config.max_feedback_drop
        self._add("feedback", "fail" if dropped else "pass", what)

    def divergence(self) -> None:
        limit, c = self.config.max_divergence, self.cand
        if limit <= 0:
            return
        if c.divergence_count < self.config.min_requests:
            self._add("divergence", "pending", f"{c.divergence_count} compared answers")
            return
        what = f"mean divergence {c.divergence_mean:.3f} over {c.divergence_count}, max {limit:g}"
        self._add("divergence", "fail" if c.divergence_mean > limit else "pass", what)

    def samples(self) -> bool:
        config, c, s = self.config, self.cand, self.stab
        enough = c.requests >= config.min_requests and s.requests >= config.min_stable_requests
        mirrored = self.release.mirrored_evidence
        of_them = f" ({mirrored} mirrored)" if mirrored else ""
        self._add(
            "samples",
            "pass" if enough else "pending",
            f"candidate {c.requests}/{config.min_requests}{of_them}, "
            f"stable {s.requests}/{config.min_stable_requests} results",
        )
        return enough


def decide(release: Release, now: float) -> Decision:
    """The verdict on a running release's current step at ``now``."""
    judge = _Judge(release, now)
    judge.evaluation()
    judge.errors()
    judge.error_cap()
    judge.deadlines()
    judge.infrastructure()
    judge.latency()
    judge.feedback()
    judge.divergence()
    enough = judge.samples()
    checks, numbers = tuple(judge.checks), judge.numbers
    arm = _evidence_text(release)
    if judge.failures:
        return Decision(
            DecisionKind.ROLLBACK, "; ".join(judge.failures), numbers, checks=checks, verdict="fail"
        )
    pending = [c.name for c in checks if c.status == "pending" and c.name in _BLOCKING]
    if enough and not pending:
        summary = (
            f"candidate healthy over {judge.cand.requests} {arm} "
            f"(error rate {judge.cand.error_rate:.2%}, p95 {judge.cand.latency_p95_ms:.1f} ms)"
        )
        if release.strategy is Strategy.SHADOW:
            return Decision(DecisionKind.REPORT, summary, numbers, checks=checks, verdict="pass")
        step = next_step(release)
        what = "final promotion" if step.final else f"step {step.step_index} at {step.weight}%"
        return Decision(
            DecisionKind.PROMOTE, f"{summary}: {what}", numbers, step, checks, verdict="pass"
        )
    waited = now - release.step_started_at
    waiting = ", ".join(c.detail for c in checks if c.status == "pending" and c.name in _BLOCKING)
    if judge.holds:
        # Not the candidate's doing: neither the time limit's action nor a pass applies.
        # (The verdict stays one of the contract's; the held checks and reason say why.)
        held = tuple(judge.holds)
        reason = "; ".join(h.detail for h in held)
        return Decision(
            DecisionKind.WAIT, reason, numbers, checks=checks, verdict="inconclusive", held=held
        )
    if waited >= release.config.step_timeout_s:
        return _timed_out(release, waited, waiting, numbers, checks)
    return Decision(
        DecisionKind.WAIT,
        f"inconclusive: {waiting}",
        numbers,
        checks=checks,
        verdict="inconclusive",
    )


def _evidence_text(release: Release) -> str:
    """What the candidate's results are: its own requests, mirrored ones, or both."""
    if release.strategy.judges_shadow:
        return "shadow results"
    mirrored = release.mirrored_evidence
    return f"requests ({mirrored} of them mirrored)" if mirrored else "requests"


_INFRA_OUTCOMES = frozenset({Outcome.CAPACITY, Outcome.TRANSPORT, Outcome.DEADLINE})


# Checks whose pending state keeps a step from passing (feedback and divergence need data
# many releases never get: without it they simply do not count).
_BLOCKING = frozenset({"samples", "errors", "error_cap", "infrastructure"})


def _infra_text(arm: ArmData) -> str:
    text = (
        f"{arm.infra_errors}/{arm.results} infrastructure ({arm.capacity} capacity, "
        f"{arm.transport} transport, {arm.deadlines} deadline)"
    )
    return text + (f", {arm.mirror_refused} mirrors refused" if arm.mirror_refused else "")


def _timed_out(
    release: Release,
    waited: float,
    waiting: str,
    numbers: dict[str, float],
    checks: tuple[Check, ...],
) -> Decision:
    action = release.config.on_inconclusive
    reason = f"step still inconclusive after {waited:.0f} s ({waiting})"
    if action is Inconclusive.ROLLBACK:
        return Decision(
            DecisionKind.ROLLBACK, reason, numbers, checks=checks, verdict="inconclusive"
        )
    if action is Inconclusive.PROMOTE and release.strategy is not Strategy.SHADOW:
        step = next_step(release)
        return Decision(
            DecisionKind.PROMOTE,
            f"{reason}: promoting as configured",
            numbers,
            step,
            checks,
            verdict="inconclusive",
        )
    return Decision(
        DecisionKind.WAIT, f"{reason}: holding", numbers, checks=checks, verdict="inconclusive"
    )
