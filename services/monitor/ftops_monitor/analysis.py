"""Release state and the promote / rollback / wait rule. Pure Python, unit-tested.

Rules for a running release with automatic analysis, over the candidate's results since
its current step began:
  * fewer than ``min_requests`` results: wait, except an early rollback once at least
    ``EARLY_MIN_RESULTS`` results are in and the errors alone already exceed
    ``max_error_rate * min_requests`` (the step can no longer pass);
  * error rate above ``max_error_rate``: rollback;
  * ``max_latency_ratio`` > 0 and the stable version has latency data and the candidate
    p95 exceeds ratio * stable p95: rollback;
  * otherwise promote to the next step (final when its weight is 100 or it is the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ftops_monitor.windows import Figures, Sample, figures

EARLY_MIN_RESULTS = 5


class ReleaseState(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class DecisionKind(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    WAIT = "wait"


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0
    auto: bool = True


@dataclass
class Release:
    release_id: str
    alias: str
    stable_version_id: str
    candidate_version_id: str
    steps: list[int]
    thresholds: Thresholds
    started_at: float
    step_index: int = 0
    weight: int = 0
    state: ReleaseState = ReleaseState.RUNNING
    step_started_at: float = 0.0
    # Candidate results since the current step began.
    step_samples: list[Sample] = field(default_factory=list)
    last_decision: str = ""
    last_reason: str = ""

    def __post_init__(self) -> None:
        if not self.weight and self.steps:
            self.weight = self.steps[0]
        if not self.step_started_at:
            self.step_started_at = self.started_at

    def add_candidate_sample(self, sample: Sample) -> None:
        if self.state is ReleaseState.RUNNING and sample.at >= self.step_started_at:
            self.step_samples.append(sample)

    def step_figures(self) -> Figures:
        return figures(self.step_samples)

    def apply_promote(self, step_index: int, weight: int, final: bool, at: float) -> bool:
        """Move forward (never backwards); False when the promotion changes nothing."""
        if self.state is not ReleaseState.RUNNING or step_index < self.step_index:
            return False
        if not final and step_index == self.step_index and weight == self.weight:
            return False
        self.step_index = step_index
        self.weight = 100 if final else weight
        self.step_samples = []
        self.step_started_at = max(at, self.step_started_at)
        if final:
            self.state = ReleaseState.PROMOTED
        return True

    def apply_rollback(self) -> bool:
        """Rollback of the running release, or of its completed promotion."""
        if self.state is ReleaseState.ROLLED_BACK:
            return False
        self.state = ReleaseState.ROLLED_BACK
        self.step_samples = []
        return True


@dataclass(frozen=True)
class NextStep:
    step_index: int
    weight: int
    final: bool


def next_step(release: Release) -> NextStep:
    following = release.step_index + 1
    if following >= len(release.steps):
        return NextStep(release.step_index, 100, True)
    weight = release.steps[following]
    return NextStep(following, weight, weight >= 100 or following == len(release.steps) - 1)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str
    figures: dict[str, float]
    next: NextStep | None = None


def decision_figures(candidate: Figures, stable_p95_ms: float | None) -> dict[str, float]:
    out = {
        "requests": float(candidate.requests),
        "errors": float(candidate.errors),
        "error_rate": candidate.error_rate,
        "p50_ms": candidate.latency_p50_ms,
        "p95_ms": candidate.latency_p95_ms,
    }
    if stable_p95_ms is not None:
        out["stable_p95_ms"] = stable_p95_ms
    return out


def decide(release: Release, candidate: Figures, stable: Figures | None) -> Decision:
    """The decision for a running release given the candidate's figures in this step and
    the stable version's window figures (None or empty when it has no data)."""
    limits = release.thresholds
    stable_p95 = stable.latency_p95_ms if stable is not None and stable.ok_requests else None
    numbers = decision_figures(candidate, stable_p95)
    numbers["min_requests"] = float(limits.min_requests)
    numbers["weight"] = float(release.weight)
    error_budget = limits.max_error_rate * limits.min_requests
    if candidate.requests < limits.min_requests:
        if candidate.requests >= EARLY_MIN_RESULTS and candidate.errors > error_budget:
            return Decision(
                DecisionKind.ROLLBACK,
                f"candidate errors: {candidate.errors} of its first {candidate.requests} "
                f"requests failed, more than the {error_budget:g} allowed in "
                f"{limits.min_requests} (max error rate {limits.max_error_rate:.2%})",
                numbers,
            )
        return Decision(
            DecisionKind.WAIT,
            f"waiting for {limits.min_requests} candidate requests ({candidate.requests} so far)",
            numbers,
        )
    if candidate.error_rate > limits.max_error_rate:
        return Decision(
            DecisionKind.ROLLBACK,
            f"candidate error rate {candidate.error_rate:.2%} over {candidate.requests} "
            f"requests exceeds {limits.max_error_rate:.2%}",
            numbers,
        )
    if (
        limits.max_latency_ratio > 0
        and stable_p95 is not None
        and stable_p95 > 0
        and candidate.latency_p95_ms > limits.max_latency_ratio * stable_p95
    ):
        return Decision(
            DecisionKind.ROLLBACK,
            f"candidate p95 latency {candidate.latency_p95_ms:.1f} ms exceeds "
            f"{limits.max_latency_ratio:g} x stable p95 {stable_p95:.1f} ms",
            numbers,
        )
    step = next_step(release)
    what = "final promotion" if step.final else f"step {step.step_index} at {step.weight}%"
    return Decision(
        DecisionKind.PROMOTE,
        f"candidate healthy over {candidate.requests} requests "
        f"(error rate {candidate.error_rate:.2%}, p95 {candidate.latency_p95_ms:.1f} ms): {what}",
        numbers,
        step,
    )
