"""Alert rules on every serving version, stable included. Pure Python.

A rule's condition is evaluated on the version's sliding-window figures at every tick; it
fires once the condition has held for ``for_s`` seconds and resolves as soon as it stops
holding (or the version has no data left in the window). Each transition is reported once.

Release holds (``evaluate_holds``) go through the same states: the analysis holds a step
on failures that are not the candidate's (both arms over the error cap, infrastructure
failures), and an operator has to hear of it, since nothing moves the release meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ftops_monitor.windows import Figures
from ftops_runtime.events import derived_event_id

FIRING = "firing"
RESOLVED = "resolved"
# Narrowest bucket of an alert's start time in its event id (see AlertBook.event_id).
MIN_ID_BUCKET_S = 1.0
# Rule name of a held release step: the prefix and the analysis check that holds it.
RELEASE_HELD = "release_held"


@dataclass(frozen=True)
class AlertRules:
    """0 turns a rule off."""

    error_rate_above: float = 0.1
    p99_latency_above_ms: float = 0.0
    feedback_below: float = 0.0
    for_s: float = 30.0
    # Too few results (or scores) in the window say nothing: the rule does not hold.
    min_requests: int = 10
    min_feedback: int = 10
    # A release step held this long raises its alert (the hold is a sustained condition
    # already: a step stays held until the failures are diluted or the step restarts).
    release_held_for_s: float = 5.0


@dataclass(frozen=True)
class Rule:
    name: str
    threshold: float
    value: Callable[[Figures], float]
    holds: Callable[[float, float], bool]
    enough: Callable[[Figures], bool]
    describe: str


def rules_from(config: AlertRules) -> list[Rule]:
    rules: list[Rule] = []
    if config.error_rate_above > 0:
        rules.append(
            Rule(
                "error_rate",
                config.error_rate_above,
                lambda f: f.error_rate,
                lambda v, t: v > t,
                lambda f: f.requests >= config.min_requests,
                "error rate {value:.1%} above {threshold:.1%}",
            )
        )
    if config.p99_latency_above_ms > 0:
        rules.append(
            Rule(
                "latency_p99",
                config.p99_latency_above_ms,
                lambda f: f.latency_p99_ms,
                lambda v, t: v > t,
                lambda f: f.ok_requests >= config.min_requests,
                "p99 latency {value:.0f} ms above {threshold:.0f} ms",
            )
        )
    if config.feedback_below > 0:
        rules.append(
            Rule(
                "feedback",
                config.feedback_below,
                lambda f: f.feedback_mean,
                lambda v, t: v < t,
                lambda f: f.feedback_count >= config.min_feedback,
                "mean feedback {value:.2f} below {threshold:.2f}",
            )
        )
    return rules


@dataclass
class AlertState:
    rule: str
    alias: str
    version_id: str
    since: float  # when the condition began to hold
    value: float
    threshold: float
    message: str
    firing: bool = False
    # How long the condition must hold before firing (the rule's), for the event id.
    for_s: float = 0.0


@dataclass(frozen=True)
class Condition:
    """A condition that holds now, with what the alert says about it."""

    value: float
    threshold: float
    message: str


@dataclass(frozen=True)
class Transition:
    state: str  # FIRING or RESOLVED
    alert: AlertState
    for_seconds: float


class AlertBook:
    def __init__(self, config: AlertRules) -> None:
        self.config = config
        self.rules = rules_from(config)
        self._states: dict[tuple[str, str, str], AlertState] = {}

    def evaluate(self, figures: Mapping[tuple[str, str], Figures], now: float) -> list[Transition]:
        """Transitions since the last call, given every version's window figures (a
        version missing from ``figures`` has no data: its conditions do not hold)."""
        out: list[Transition] = []
        keys = set(figures) | {(a, v) for _, a, v in self._states}
        for alias, version_id in sorted(keys):
            # (Release holds share the states; their rules are not among these.)
            f = figures.get((alias, version_id), Figures())
            for rule in self.rules:
                out.extend(self._step(rule, alias, version_id, f, now))
        return out

    def evaluate_holds(
        self, holds: Mapping[tuple[str, str, str], Condition], now: float
    ) -> list[Transition]:
        """Transitions of release-hold alerts, given the holds now, keyed by (rule, alias,
        candidate version); a hold missing from ``holds`` has ended and resolves."""
        out: list[Transition] = []
        held = {k for k in self._states if k[0].startswith(RELEASE_HELD)}
        for key in sorted(set(holds) | held):
            condition = holds.get(key)
            resolved = f"{key[0]}: the step is no longer held"
            out.extend(self._track(key, condition, resolved, now, self.config.release_held_for_s))
        return out

    def _step(
        self, rule: Rule, alias: str, version_id: str, f: Figures, now: float
    ) -> list[Transition]:
        value = rule.value(f)
        condition = None
        if rule.enough(f) and rule.holds(value, rule.threshold):
            message = rule.describe.format(value=value, threshold=rule.threshold)
            condition = Condition(value, rule.threshold, message)
        resolved = f"{rule.name} back within {rule.threshold:g} (now {value:.4g})"
        return self._track(
            (rule.name, alias, version_id), condition, resolved, now, self.config.for_s, value
        )

    def _track(
        self,
        key: tuple[str, str, str],
        condition: Condition | None,
        resolved: str,
        now: float,
        for_s: float,
        value_now: float = 0.0,
    ) -> list[Transition]:
        """One condition's state: fires after ``for_s`` of holding, resolves once not."""
        state = self._states.get(key)
        if condition is None:
            if state is None:
                return []
            del self._states[key]
            if not state.firing:
                return []
            state.value, state.message = value_now, resolved
            return [Transition(RESOLVED, state, now - state.since)]
        if state is None:
            name, alias, version_id = key
            state = self._states[key] = AlertState(
                name, alias, version_id, now, condition.value, condition.threshold, "", for_s=for_s
            )
        state.value, state.threshold, state.message = (
            condition.value,
            condition.threshold,
            condition.message,
        )
        if not state.firing and now - state.since >= for_s:
            state.firing = True
            return [Transition(FIRING, state, now - state.since)]
        return []

    def event_id(self, transition: Transition) -> str:
        """The same id on every replica for one transition of one episode of a condition.

        Replicas evaluate the same results at their own ticks, so the moment a condition
        began (``since``) differs between them by about a tick: the id takes it rounded
        down to a bucket of ``for_s``. Two episodes that publish anything begin more than
        ``for_s`` apart (the first fires, then resolves, before the next begins), so they
        never share a bucket (with ``for_s`` under ``MIN_ID_BUCKET_S``, episodes closer
        than that may: the later one is dropped as a duplicate). Left over: replicas
        straddling a bucket boundary (about a tick in ``for_s``), or a replica that started
        after the condition began, publish the transition twice."""
        alert = transition.alert
        bucket = max(alert.for_s, MIN_ID_BUCKET_S)
        episode = math.floor(alert.since / bucket)
        return derived_event_id(
            "alert", alert.rule, alert.alias, alert.version_id, transition.state, episode
        )

    def active(self, alias: str = "") -> list[AlertState]:
        return sorted(
            (s for s in self._states.values() if s.firing and (not alias or s.alias == alias)),
            key=lambda s: (s.alias, s.version_id, s.rule),
        )
