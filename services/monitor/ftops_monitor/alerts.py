"""Alert rules on every serving version, stable included. Pure Python.

A rule's condition is evaluated on the version's sliding-window figures at every tick; it
fires once the condition has held for ``for_s`` seconds and resolves as soon as it stops
holding (or the version has no data left in the window). Each transition is reported once.
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
            f = figures.get((alias, version_id), Figures())
            for rule in self.rules:
                out.extend(self._step(rule, alias, version_id, f, now))
        return out

    def _step(
        self, rule: Rule, alias: str, version_id: str, f: Figures, now: float
    ) -> list[Transition]:
        key = (rule.name, alias, version_id)
        value = rule.value(f)
        holds = rule.enough(f) and rule.holds(value, rule.threshold)
        state = self._states.get(key)
        if not holds:
            if state is None:
                return []
            del self._states[key]
            if not state.firing:
                return []
            state.value = value
            state.message = f"{rule.name} back within {rule.threshold:g} (now {value:.4g})"
            return [Transition(RESOLVED, state, now - state.since)]
        message = rule.describe.format(value=value, threshold=rule.threshold)
        if state is None:
            state = self._states[key] = AlertState(
                rule.name, alias, version_id, now, value, rule.threshold, message
            )
        state.value, state.message = value, message
        if not state.firing and now - state.since >= self.config.for_s:
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
        bucket = max(self.config.for_s, MIN_ID_BUCKET_S)
        episode = math.floor(alert.since / bucket)
        return derived_event_id(
            "alert", alert.rule, alert.alias, alert.version_id, transition.state, episode
        )

    def active(self, alias: str = "") -> list[AlertState]:
        return sorted(
            (s for s in self._states.values() if s.firing and (not alias or s.alias == alias)),
            key=lambda s: (s.alias, s.version_id, s.rule),
        )
