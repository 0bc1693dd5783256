"""The monitor's core: consumes request results and release events, keeps per-version
windows and release state, runs the analysis and the alert rules, publishes decisions.

Release state has one owner, the gateway: it applies every command and every decision in
its store and publishes the release's whole state on ``route.changed``. The monitor only
follows that state (rebuilt at start by replaying the subject; a snapshot older than the
revision applied is ignored) and decides: it publishes ``release.promote`` /
``release.rollback`` and does not change its own view until the gateway's next snapshot
shows what was applied. There is no manual promote or rollback here: those are the
gateway's commands.

Every replica consumes every result and judges every release, so replicas take the same
decisions; each decision and alert event gets an id derived from what it says
(``decision_event_id``, ``AlertBook.event_id``), and JetStream stores one of the copies.

Feedback likewise reaches every replica: the replica a ``SubmitFeedback`` call hits checks
it and publishes ``metrics.feedback``, and every replica applies that event (the one that
took the call at once, for read-your-writes; its own copy arriving later is a no-op).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.monitor.v1 import monitor_pb2
from ftops_monitor.alerts import FIRING, RELEASE_HELD, AlertBook, AlertRules, AlertState, Condition
from ftops_monitor.analysis import (
    Config,
    Decision,
    DecisionKind,
    Hold,
    Release,
    ReleaseState,
    Strategy,
    decide,
)
from ftops_monitor.evaluation import EvaluationLookup, judge_evaluations
from ftops_monitor.feedback import Given, RequestIndex, Served

# CLIENT_FAULTS re-exported: the dashboard's history skips the same results.
from ftops_monitor.outcomes import CLIENT_FAULTS as CLIENT_FAULTS
from ftops_monitor.outcomes import Outcome, classify
from ftops_monitor.views import alert_event, release_analysis, version_stats
from ftops_monitor.windows import Figures, Sample, StatsBook
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import (
    InvalidArgument,
    NotFound,
    PermanentEventError,
    Unavailable,
)
from ftops_runtime.events import (
    METRICS_FEEDBACK,
    MONITOR_ALERT,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    derived_event_id,
    new_meta,
)
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ARM_CANDIDATE = "candidate"
ARM_STABLE = "stable"
ARM_SHADOW = "shadow"
SEEN_MAX = 200_000
COALESCE_S = 0.02
# How long SubmitFeedback waits for JetStream to store its event before UNAVAILABLE.
FEEDBACK_PUBLISH_TIMEOUT_S = 2.0
# A published decision the gateway's state has not reflected after this long (the gateway
# was down, or ignored it as stale) lets the step be judged again.
PENDING_DECISION_S = 10.0
# Releases other than each alias's latest kept in memory (dashboard history); older ones are
# the registry's to tell.
KEEP_ENDED_RELEASES = 200


def _seconds(ts: Timestamp, default: float) -> float:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else default


def _check_score(score: float) -> None:
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise InvalidArgument(f"score must be within 0..1, got {score}")


class SeenEvents:
    """Recently handled event ids (bounded; old ids are long past redelivery)."""

    def __init__(self, limit: int = SEEN_MAX) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, event_id: str) -> bool:
        """True the first time ``event_id`` is seen (empty ids are always new)."""
        if not event_id:
            return True
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return True


def decision_event_id(release: Release, decision: Decision) -> str:
    """The id of a promotion or rollback, the same on every replica that takes it.

    JetStream drops a message whose ``Nats-Msg-Id`` it stored within the stream's duplicate
    window (120 s, ``ensure_streams``), so replicas deciding the same step moments apart
    publish it once; a copy past the window is ignored by the gateway (a step it already
    took, a release already ended).

    A release is rolled back at most once. A promotion names its target step and when the
    current step began (the gateway's time, on every replica alike): after a pause and a
    resume the step begins again, and the promotion taken then is a new decision, not a
    duplicate of one the gateway ignored while the release was paused.
    """
    if decision.kind is DecisionKind.ROLLBACK:
        return derived_event_id("rollback", release.release_id)
    if decision.kind is not DecisionKind.PROMOTE or decision.next is None:
        raise ValueError(f"{decision.kind.value} is not published")
    step = decision.next
    return derived_event_id(
        "promote",
        release.release_id,
        step.step_index,
        step.weight,
        step.final,
        round(release.step_started_at * 1e6),
    )


class Monitor:
    def __init__(
        self,
        bus: EventBus,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        alert_rules: AlertRules | None = None,
        evaluations: EvaluationLookup | None = None,
        requests: RequestIndex | None = None,
    ) -> None:
        self.bus = bus
        self.stats = StatsBook(window_s)
        self.clock = clock
        self.alerts = AlertBook(alert_rules or AlertRules())
        self.requests = requests or RequestIndex()
        self.releases: dict[str, Release] = {}
        # Counters for the scrape endpoint: results by (alias, version, arm, outcome),
        # decisions by (alias, kind), alert transitions by (rule, state).
        self.results_total: Counter[tuple[str, str, str, str]] = Counter()
        self.decisions_total: Counter[tuple[str, str]] = Counter()
        self.alerts_total: Counter[tuple[str, str]] = Counter()
        self._evaluations = evaluations
        self._evaluated: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._latest: dict[str, str] = {}  # alias -> release_id of its newest release
        self._seen = SeenEvents()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        # Per release: the data its last verdict saw (nothing new -> no need to re-judge).
        self._judged: dict[str, tuple[object, ...]] = {}
        # Per release: what holds its current step, from its last verdict (alerts).
        self._holds: dict[str, tuple[Hold, ...]] = {}

    # -- state queries ---------------------------------------------------------------

    def release_for(self, alias: str) -> Release | None:
        release_id = self._latest.get(alias)
        return self.releases.get(release_id) if release_id else None

    def latest_releases(self) -> list[Release]:
        return [self.releases[r] for r in self._latest.values()]

    def _known_alias(self, alias: str) -> bool:
        return alias in self._latest or self.stats.has_alias(alias)

    # -- request results -------------------------------------------------------------

    async def on_metrics(self, batch: events_pb2.RequestResultBatch, delivery: Delivery) -> None:
        if not self._seen.add(batch.meta.event_id):
            return
        self.ingest(batch.results)
        self._wake.set()  # judge now rather than at the next tick

    def ingest(self, results: Iterable[events_pb2.RequestResult]) -> None:
        now = self.clock()
        for result in results:
            outcome = classify(result.status, result.failure_origin)
            if outcome is Outcome.CLIENT:
                # A malformed or abandoned request says nothing about the version.
                continue
            shadow = result.shadow or result.arm == ARM_SHADOW
            sample = Sample(
                at=_seconds(result.finished_at, now),
                latency_ms=result.latency_ms,
                ok=result.status == "OK",
                ttft_ms=result.ttft_ms,
                completion_tokens=result.completion_tokens,
                divergence=result.divergence if shadow else -1.0,
            )
            # "error" is the version's own failure; the others name the infrastructure's.
            label = "error" if outcome is Outcome.REPLICA else outcome.value
            self.results_total[(result.alias, result.version_id, result.arm, label)] += 1
            self.stats.add(result.alias, result.version_id, sample)
            if not shadow:
                # Users only rate answers they saw.
                served = Served(
                    result.alias, result.version_id, result.arm, result.release_id, sample.at
                )
                self.requests.add(result.request_id, served, answered=result.fallback)
            release = self.release_for(result.alias)
            if (
                release is not None
                and result.release_id in ("", release.release_id)
                and release.in_step(sample.at)
            ):
                self._add_to_step(release, result, shadow, sample, outcome)
        self.requests.prune(now)

    @staticmethod
    def _add_to_step(
        release: Release,
        result: events_pb2.RequestResult,
        shadow: bool,
        sample: Sample,
        outcome: Outcome,
    ) -> None:
        # The arms count infrastructure outcomes apart from the versions' own (ArmData).
        if result.version_id == release.candidate_version_id:
            # Mirrored results are evidence for every strategy (a canary's "mirrored
            # evidence" tops up a small step); the candidate's own requests only for canary,
            # blue-green and shadow judge the mirror alone.
            if shadow:
                release.candidate.add(sample, mirrored=True, outcome=outcome)
            elif result.arm == ARM_CANDIDATE and not release.strategy.judges_shadow:
                release.candidate.add(sample, outcome=outcome)
        elif (
            result.version_id == release.stable_version_id
            and result.arm == ARM_STABLE
            and not shadow
        ):
            release.stable.add(sample, outcome=outcome)

    # -- feedback --------------------------------------------------------------------

    def feedback_event(
        self, request_id: str, score: float, comment: str = ""
    ) -> events_pb2.FeedbackSubmitted:
        """The ``metrics.feedback`` event for a score given now, with where the request was
        served: INVALID_ARGUMENT for a bad score, NOT_FOUND for a request not known here."""
        if not request_id:
            raise InvalidArgument("request_id is required")
        _check_score(score)
        self.requests.prune(self.clock())
        served = self.requests.get(request_id)
        if served is None:
            raise NotFound(
                f"request {request_id!r} is unknown: its result has not reached the monitor "
                f"yet or is older than {self.requests.max_age_s:g} s"
            )
        given_at = self.clock()
        held = self.requests.held(request_id)
        if held is not None and given_at <= held.at:
            # A second call replaces the first, even within one tick of the clock or after
            # a score stamped by a replica whose clock runs ahead.
            given_at = held.at + 1e-3
        meta = self._meta()
        meta.occurred_at.FromNanoseconds(round(given_at * 1e9))
        event = events_pb2.FeedbackSubmitted(
            meta=meta,
            request_id=request_id,
            score=score,
            comment=comment,
            alias=served.alias,
            version_id=served.version_id,
            arm=served.arm,
            release_id=served.release_id,
        )
        event.served_at.FromNanoseconds(round(served.at * 1e9))
        return event

    async def submit_feedback(
        self, request_id: str, score: float, comment: str = ""
    ) -> monitor_pb2.SubmitFeedbackResponse:
        """Checks a score, has JetStream store it on ``metrics.feedback`` for every replica,
        and applies it here at once. UNAVAILABLE, with nothing recorded here, when NATS
        does not take it: a score kept by one replica alone would count for that replica's
        verdicts only. A retry is safe (one score per request: the latest holds)."""
        event = self.feedback_event(request_id, score, comment)
        replaced = self.requests.held(request_id) is not None
        if not self.bus.ready:
            raise Unavailable(
                "feedback not recorded: NATS is unreachable, and every monitor replica must "
                "see a score; try again shortly"
            )
        try:
            await self.bus.publish(METRICS_FEEDBACK, event, timeout=FEEDBACK_PUBLISH_TIMEOUT_S)
        except Exception as exc:
            raise Unavailable(
                f"feedback not recorded: NATS did not store it ({exc!r}); try again shortly"
            ) from exc
        # Read-your-writes here; the event's delivery to this replica is then a no-op
        # (or it came first, and this is).
        self.apply_feedback(event)
        return monitor_pb2.SubmitFeedbackResponse(
            request_id=request_id,
            alias=event.alias,
            version_id=event.version_id,
            arm=event.arm,
            replaced=replaced,
        )

    async def on_feedback(self, event: events_pb2.FeedbackSubmitted, delivery: Delivery) -> None:
        try:
            if not event.request_id:
                raise InvalidArgument("request_id is empty")
            _check_score(event.score)
        except InvalidArgument as exc:
            raise PermanentEventError(f"feedback event {event.meta.event_id}: {exc}") from exc
        self.apply_feedback(event)

    def apply_feedback(self, event: events_pb2.FeedbackSubmitted) -> bool:
        """Counts a score for the version and arm that answered (as the event says), once:
        False when it changes nothing, for an event already applied (redelivered, or the
        copy of one taken here) or one older than the request's score (the latest given
        holds, ``Given.supersedes``)."""
        if not self._seen.add(event.meta.event_id):
            return False
        now = self.clock()
        given = Given(_seconds(event.meta.occurred_at, now), event.meta.event_id, event.score)
        served = Served(
            event.alias,
            event.version_id,
            event.arm,
            event.release_id,
            _seconds(event.served_at, given.at),
        )
        self.requests.prune(now)
        if not self.requests.record(event.request_id, served, given):
            return False
        request_id, score = event.request_id, event.score
        # The windows place it at the moment this replica learned of it, like results.
        self.stats.add_feedback(served.alias, served.version_id, request_id, score, now)
        release = self.release_for(served.alias)
        if (
            release is not None
            and served.release_id in ("", release.release_id)
            and release.in_step(served.at)
        ):
            if (served.version_id, served.arm) == (release.candidate_version_id, ARM_CANDIDATE):
                release.candidate.feedback.put(request_id, score, now)
            elif (served.version_id, served.arm) == (release.stable_version_id, ARM_STABLE):
                release.stable.feedback.put(request_id, score, now)
        if event.comment:
            log.debug(
                "feedback %.2f on %s (%s): %s", score, request_id, served.version_id, event.comment
            )
        self._wake.set()
        return True

    # -- release state (the gateway's route.changed) ----------------------------------

    async def on_route_changed(self, event: events_pb2.RouteChanged, delivery: Delivery) -> None:
        self.apply_route_changed(event)
        self._wake.set()

    def apply_route_changed(self, event: events_pb2.RouteChanged) -> None:
        """Follow the gateway's release state (idempotent; stale revisions ignored)."""
        snap = event.release
        if not snap.release_id:
            return  # a route without a release (SetRoute on a new alias)
        state = ReleaseState.of_snapshot(snap.state)
        paused = snap.state == "paused"
        weight = 100 if state is ReleaseState.PROMOTED else snap.candidate_weight
        step_started = _seconds(snap.step_started_at, 0.0)
        release = self.releases.get(snap.release_id)
        if release is None:
            release = Release(
                release_id=snap.release_id,
                alias=event.alias,
                stable_version_id=snap.stable_version_id,
                candidate_version_id=snap.candidate_version_id,
                steps=list(snap.steps) or [snap.candidate_weight or 100],
                config=Config.from_proto(snap.analysis),
                started_at=_seconds(snap.started_at, self.clock()),
                strategy=Strategy.from_proto(snap.strategy),
                step_index=snap.step_index,
                weight=weight,
                state=state,
                paused=paused,
                step_started_at=step_started,
                revision=event.revision,
            )
            self.releases[release.release_id] = release
            newest = self.release_for(event.alias)
            if newest is None or release.started_at >= newest.started_at:
                self._latest[event.alias] = release.release_id
            self._forget_old_releases()
            log.info(
                "release %s of %s (%s, %s): %s -> %s steps %s",
                release.release_id,
                release.alias,
                release.strategy.value,
                snap.state,
                release.stable_version_id,
                release.candidate_version_id,
                release.steps,
            )
        elif not release.follow(
            event.revision,
            state,
            paused=paused,
            step_index=snap.step_index,
            weight=weight,
            step_started_at=step_started,
        ):
            return
        change = snap.change
        if change.kind in ("promote", "rollback", "replaced"):
            release.last_decision, release.last_reason = change.kind, change.reason
        elif change.kind in ("paused", "resumed"):
            log.info(
                "release %s of %s %s: %s",
                release.release_id,
                release.alias,
                change.kind,
                change.reason,
            )

    def _forget_old_releases(self) -> None:
        """Keep the latest release of each alias and the newest KEEP_ENDED_RELEASES others
        (the registry has the whole history): memory stays bounded however many releases
        an installation runs."""
        latest = set(self._latest.values())
        older = [r for r in self.releases.values() if r.release_id not in latest]
        if len(older) <= KEEP_ENDED_RELEASES:
            return
        older.sort(key=lambda r: r.started_at)
        for release in older[: len(older) - KEEP_ENDED_RELEASES]:
            del self.releases[release.release_id]
            self._judged.pop(release.release_id, None)
            self._evaluated.discard(release.release_id)

    # -- decisions -------------------------------------------------------------------

    def _judged_key(self, release: Release) -> tuple[object, ...]:
        c, s = release.candidate, release.stable
        return (
            c.results + c.mirror_refused,
            s.results,
            c.feedback.revision,
            s.feedback.revision,
            release.step_started_at,
            release.evaluation_failure,
        )

    async def analyze_once(self) -> list[Decision]:
        """Judge every running automatic release (publishing promotions and rollbacks),
        then the alert rules."""
        made: list[Decision] = []
        async with self._lock:
            now = self.clock()
            for release in self.latest_releases():
                if not release.running or not release.config.auto or release.paused:
                    continue
                if release.pending_decision and now - release.pending_since < PENDING_DECISION_S:
                    continue  # the gateway has not shown yet what it did with it
                self._ensure_evaluation(release)
                key = self._judged_key(release)
                timed_out = now - release.step_started_at >= release.config.step_timeout_s
                if self._judged.get(release.release_id) == key and not timed_out:
                    continue
                decision = decide(release, now)
                self._note_hold(release, decision)
                if decision.kind is DecisionKind.WAIT:
                    self._judged[release.release_id] = key
                    continue
                if decision.kind is DecisionKind.REPORT:
                    if release.last_decision != "report":
                        log.info(
                            "shadow %s of %s: %s",
                            release.release_id,
                            release.alias,
                            decision.reason,
                        )
                    release.last_decision, release.last_reason = "report", decision.reason
                    self._judged[release.release_id] = key
                    continue
                try:
                    await self._publish(release, decision)
                except Unavailable as exc:
                    # Not marked judged: the next tick takes the decision again.
                    log.warning(
                        "%s of %s waits for NATS: %s", decision.kind.value, release.alias, exc
                    )
                    continue
                self._judged[release.release_id] = key
                made.append(decision)
            await self._evaluate_alerts(now)
        return made

    async def run(self, interval_s: float) -> None:
        # A flag as well as cancellation: wait_for can swallow a cancel (runtime/tasks.py).
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            if self._wake.is_set():
                # Batches from several gateways come in bursts: judge them together.
                await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            try:
                await self.analyze_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS down: the same decision is taken again on a later tick.
                log.warning("release analysis failed: %s", exc)

    async def settled(self) -> None:
        """Waits for the background lookups started so far (tests, orderly shutdown)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        await cancel_and_wait(list(self._tasks))

    def _ensure_evaluation(self, release: Release) -> None:
        """Fetch the registry's evaluations once per release, in the background."""
        if self._evaluations is None or release.release_id in self._evaluated:
            return
        self._evaluated.add(release.release_id)
        task = asyncio.create_task(self._fetch_evaluation(release, self._evaluations))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_evaluation(self, release: Release, lookup: EvaluationLookup) -> None:
        candidate = await lookup(release.candidate_version_id)
        stable = await lookup(release.stable_version_id) if release.stable_version_id else None
        verdict = judge_evaluations(candidate, stable)
        release.evaluation_failure = verdict.failure
        release.evaluation_figures = verdict.figures
        self._wake.set()

    def _meta(self, event_id: str = "") -> common_pb2.EventMeta:
        """An envelope stamped by the monitor's clock: the step a decision begins is timed
        on the same clock as the analysis (an injected one in tests). A decision's
        ``event_id`` is derived from the event's content, so replicas publishing the same
        one collide; without one the id is new."""
        meta = new_meta(self.bus.service, self.bus.instance)
        if event_id:
            meta.event_id = event_id
        meta.occurred_at.FromNanoseconds(int(self.clock() * 1e9))
        return meta

    async def _send(self, subject: str, event: Message) -> None:
        """Publish a decision; the state changes only once JetStream has stored it."""
        try:
            await self.bus.publish(subject, event)
        except Exception as exc:
            raise Unavailable(f"{subject} not published, nothing changed: {exc!r}") from exc

    async def _publish(self, release: Release, decision: Decision) -> None:
        # Stored once however many replicas publish it (the id derives from its content).
        meta = self._meta(decision_event_id(release, decision))
        if decision.kind is DecisionKind.PROMOTE:
            assert decision.next is not None
            promote = events_pb2.ReleasePromote(
                meta=meta,
                release_id=release.release_id,
                alias=release.alias,
                candidate_version_id=release.candidate_version_id,
                stable_version_id=release.stable_version_id,
                step_index=decision.next.step_index,
                weight=decision.next.weight,
                final=decision.next.final,
                reason=decision.reason,
                figures=decision.figures,
            )
            await self._send(RELEASE_PROMOTE, promote)
        else:
            rollback = events_pb2.ReleaseRollback(
                meta=meta,
                release_id=release.release_id,
                alias=release.alias,
                candidate_version_id=release.candidate_version_id,
                stable_version_id=release.stable_version_id,
                reason=decision.reason,
                figures=decision.figures,
            )
            await self._send(RELEASE_ROLLBACK, rollback)
        # The gateway applies it; our view changes with its route.changed.
        release.pending_decision, release.pending_since = meta.event_id, self.clock()
        self.decisions_total[(release.alias, decision.kind.value)] += 1
        log.info(
            "%s of %s (%s): %s",
            decision.kind.value,
            release.alias,
            release.release_id,
            decision.reason,
        )

    # -- alerts ----------------------------------------------------------------------

    def _note_hold(self, release: Release, decision: Decision) -> None:
        """Keeps what holds the release's step (for its alert) until the next verdict."""
        if decision.held:
            self._holds[release.release_id] = decision.held
        else:
            self._holds.pop(release.release_id, None)

    def _held_now(self) -> dict[tuple[str, str, str], Condition]:
        """The holds of releases still judged (a release that ended, was paused or
        replaced is no longer held: its alert resolves)."""
        judged = {
            r.release_id: r
            for r in self.latest_releases()
            if r.running and not r.paused and r.config.auto
        }
        self._holds = {k: v for k, v in self._holds.items() if k in judged}
        out: dict[tuple[str, str, str], Condition] = {}
        for release_id, holds in self._holds.items():
            release = judged[release_id]
            for hold in holds:
                key = (f"{RELEASE_HELD}_{hold.check}", release.alias, release.candidate_version_id)
                out[key] = Condition(hold.value, hold.threshold, hold.detail)
        return out

    async def _evaluate_alerts(self, now: float) -> None:
        figures = {key: self.stats.figures(*key, now) for key in self.stats.active(now)}
        transitions = self.alerts.evaluate(figures, now)
        transitions += self.alerts.evaluate_holds(self._held_now(), now)
        for transition in transitions:
            event = alert_event(transition.alert, transition.state, transition.for_seconds)
            event.meta.CopyFrom(self._meta(self.alerts.event_id(transition)))
            self.alerts_total[(transition.alert.rule, transition.state)] += 1
            log.log(
                logging.WARNING if transition.state == FIRING else logging.INFO,
                "alert %s %s for %s/%s: %s",
                transition.alert.rule,
                transition.state,
                transition.alert.alias,
                transition.alert.version_id,
                transition.alert.message,
            )
            try:
                await self.bus.publish(MONITOR_ALERT, event)
            except Exception as exc:
                # The transition is not repeated; the alert stays visible via ListAlerts.
                log.warning("alert event not published: %s", exc)

    def active_alerts(self, alias: str = "") -> list[AlertState]:
        return self.alerts.active(alias)

    def list_alerts(self, alias: str) -> monitor_pb2.ListAlertsResponse:
        now = self.clock()
        return monitor_pb2.ListAlertsResponse(
            alerts=[alert_event(s, FIRING, now - s.since) for s in self.alerts.active(alias)]
        )

    # -- read API --------------------------------------------------------------------

    def window_figures(self, alias: str, version_id: str) -> Figures:
        return self.stats.figures(alias, version_id, self.clock())

    def _version_stats(self, alias: str, version_id: str) -> monitor_pb2.VersionStats:
        return version_stats(
            alias, version_id, self.window_figures(alias, version_id), self.stats.window_s
        )

    def version_stats(self, alias: str, version_id: str) -> monitor_pb2.VersionStats:
        if not version_id:
            raise InvalidArgument("version_id is required")
        if alias and not self._known_alias(alias):
            raise NotFound(f"no metrics or release known for alias {alias!r}")
        return self._version_stats(alias, version_id)

    def list_stats(self, alias: str) -> monitor_pb2.ListVersionStatsResponse:
        if alias and not self._known_alias(alias):
            raise NotFound(f"no metrics or release known for alias {alias!r}")
        keys = self.stats.keys(alias if alias else None)
        return monitor_pb2.ListVersionStatsResponse(
            stats=[self._version_stats(a, v) for a, v in keys]
        )

    def analysis(self, alias: str) -> monitor_pb2.ReleaseAnalysis:
        if not alias:
            raise InvalidArgument("alias is required")
        release = self.release_for(alias)
        if release is None:
            if not self._known_alias(alias):
                raise NotFound(f"no metrics or release known for alias {alias!r}")
            return monitor_pb2.ReleaseAnalysis(alias=alias, state="none")
        now = self.clock()
        return release_analysis(
            release,
            self._version_stats(alias, release.stable_version_id),
            self._version_stats(alias, release.candidate_version_id),
            decide(release, now) if release.running else None,
            now,
        )
