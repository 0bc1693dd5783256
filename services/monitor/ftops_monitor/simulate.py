"""What-if: how fast would the monitor roll back a bad candidate at a given load?

Drives the real Monitor (analysis, statistics, decisions) with simulated traffic on a
simulated clock: requests arrive as a Poisson process, the gateway's batches reach the
monitor every ``batch_s``, the analysis runs every ``tick_s``. Reports the time from the
candidate's first request to the rollback decision and the requests it answered.

    python -m ftops_monitor.simulate --rate 50 --weight 5 --error-rate 0.3
    python -m ftops_monitor.simulate --rate 50 --weight 5 --slowdown 2
    python -m ftops_monitor.simulate --rate 50 --weight 5 --error-rate 0.3 --evidence-mirror 20

With ``--evidence-mirror`` stable requests are also sent to the candidate as the gateway
does while a canary step's weight is below that share, and each mirrored result is
reported once both answers are in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, cast

from google.protobuf.message import Message

from ftops.events.v1 import events_pb2
from ftops_monitor.monitor import Monitor
from ftops_runtime.bus import EventBus
from ftops_runtime.events import RELEASE_PROMOTE, RELEASE_ROLLBACK


class _Recorder:
    """Stands in for the bus: the simulation only needs to see what is published."""

    service = "monitor"
    instance = "simulate"

    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        self.published.append((subject, event))


@dataclass(frozen=True)
class Scenario:
    rate: float = 50.0  # requests/s on the alias
    weight: float = 5.0  # candidate percentage of the first step
    error_rate: float = 0.0  # candidate failures (stable fails at base_error_rate)
    base_error_rate: float = 0.0
    slowdown: float = 1.0  # candidate latency multiple
    latency_ms: float = 300.0  # stable median latency
    latency_spread: float = 0.25  # lognormal sigma
    batch_s: float = 0.25  # gateway reporting interval
    tick_s: float = 0.25  # analysis interval
    limit_s: float = 60.0
    max_error_rate: float = 0.05  # the gateway's default cap
    evidence_mirror: float = 0.0  # percent of traffic the candidate is judged on (0 = off)

    def mirrored_share(self) -> float:
        """Probability that a stable request is mirrored (the gateway's rule)."""
        if self.evidence_mirror <= self.weight:
            return 0.0
        return (self.evidence_mirror - self.weight) / (100.0 - self.weight)


@dataclass(frozen=True)
class Outcome:
    seconds: float | None  # first candidate request -> rollback (None: not within limit)
    candidate_requests: int
    reason: str
    promoted_s: float | None = None  # the step passed instead (after this many seconds)


def _started(s: Scenario) -> events_pb2.RouteChanged:
    """The gateway's route.changed for the release it just started."""
    weight = max(1, round(s.weight))
    event = events_pb2.RouteChanged(
        alias="sim",
        revision=1,
        stable_version_id="ver_stable",
        release=events_pb2.ReleaseSnapshot(
            release_id="rel_sim",
            state="running",
            stable_version_id="ver_stable",
            candidate_version_id="ver_candidate",
            steps=[weight, 100],
            candidate_weight=weight,
            analysis=events_pb2.AnalysisSettings(auto=True, max_error_rate=s.max_error_rate),
            evidence_mirror_percent=round(s.evidence_mirror),
            change=events_pb2.ReleaseChange(kind="started", event_id="sim-start"),
        ),
    )
    event.meta.event_id = "sim-start"
    event.release.started_at.FromNanoseconds(1_000_000_000)
    event.release.step_started_at.FromNanoseconds(1_000_000_000)
    return event


def _result(
    serial: int, arm: str, latency_ms: float, failing: bool, finished_at: float
) -> events_pb2.RequestResult:
    """One simulated request's result as the gateway reports it (``shadow``: mirrored)."""
    result = events_pb2.RequestResult(
        request_id=f"r{serial}",
        alias="sim",
        version_id="ver_stable" if arm == "stable" else "ver_candidate",
        arm=arm,
        shadow=arm == "shadow",
        latency_ms=latency_ms,
        status="INTERNAL" if failing else "OK",
        failure_origin="replica" if failing else "",
        release_id="rel_sim",
    )
    result.finished_at.FromNanoseconds(int(finished_at * 1e9))
    return result


async def run_once(s: Scenario, seed: int) -> Outcome:
    rng = random.Random(seed)
    now = [1.0]
    bus = _Recorder()
    monitor = Monitor(cast(EventBus, bus), clock=lambda: now[0])
    monitor.apply_route_changed(_started(s))
    pending: list[events_pb2.RequestResult] = []
    first: float | None = None
    answered = 0
    next_arrival = now[0] + rng.expovariate(s.rate)
    next_batch = now[0] + s.batch_s
    next_tick = now[0] + s.tick_s
    step = min(s.batch_s, s.tick_s) / 5
    mirror = s.mirrored_share()
    serial = 0
    while now[0] < 1.0 + s.limit_s:
        now[0] += step
        while next_arrival <= now[0]:
            candidate = rng.random() * 100 < s.weight
            if candidate and first is None:
                first = next_arrival
            answered += candidate
            failing = rng.random() < (s.error_rate if candidate else s.base_error_rate)
            latency = s.latency_ms * math.exp(rng.gauss(0.0, s.latency_spread))
            latency *= s.slowdown if candidate else 1.0
            serial += 1
            arm = "candidate" if candidate else "stable"
            # Reported when the request finishes, not when it arrives.
            done_at = next_arrival + latency / 1000
            pending.append(_result(serial, arm, latency, failing, done_at))
            if mirror and not candidate and rng.random() < mirror:
                if first is None:
                    first = next_arrival
                serial += 1
                shadow_latency = s.latency_ms * math.exp(rng.gauss(0.0, s.latency_spread))
                shadow_latency *= s.slowdown
                failing = rng.random() < s.error_rate
                # Reported once both answers are in, as the gateway does.
                done_at = next_arrival + max(latency, shadow_latency) / 1000
                pending.append(_result(serial, "shadow", shadow_latency, failing, done_at))
            next_arrival += rng.expovariate(s.rate)
        if now[0] >= next_batch:
            done = [r for r in pending if r.finished_at.ToNanoseconds() <= now[0] * 1e9]
            pending = [r for r in pending if r.finished_at.ToNanoseconds() > now[0] * 1e9]
            monitor.ingest(done)
            next_batch += s.batch_s
        if now[0] >= next_tick:
            await monitor.analyze_once()
            next_tick += s.tick_s
            since = now[0] - first if first is not None else None
            for subject, event in bus.published:
                if subject == RELEASE_ROLLBACK:
                    reason = cast(events_pb2.ReleaseRollback, event).reason
                    return Outcome(since, answered, reason)
                if subject == RELEASE_PROMOTE:
                    return Outcome(None, answered, "", since)
    return Outcome(None, answered, "")


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    times = sorted(o.seconds for o in outcomes if o.seconds is not None)
    caught = len(times)
    promoted = sorted(o.promoted_s for o in outcomes if o.promoted_s is not None)
    out: dict[str, Any] = {"runs": len(outcomes), "rolled_back": caught}
    out["promoted"] = len(promoted)
    if promoted:
        out["promoted_seconds_median"] = round(statistics.median(promoted), 2)
    if times:
        out["seconds_median"] = round(statistics.median(times), 2)
        out["seconds_p90"] = round(times[min(len(times) - 1, int(0.9 * len(times)))], 2)
        out["within_5s"] = round(sum(t <= 5.0 for t in times) / len(outcomes), 3)
        requests = sorted(o.candidate_requests for o in outcomes if o.seconds is not None)
        out["candidate_requests_median"] = statistics.median(requests)
    return out


async def simulate(s: Scenario, runs: int, seed: int = 0) -> dict[str, Any]:
    outcomes = [await run_once(s, seed + i) for i in range(runs)]
    return {"scenario": asdict(s), **summarize(outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--weight", type=float, default=5.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--base-error-rate", type=float, default=0.0)
    parser.add_argument("--slowdown", type=float, default=1.0)
    parser.add_argument("--max-error-rate", type=float, default=0.05)
    parser.add_argument("--evidence-mirror", type=float, default=0.0)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The simulated candidate trips the alert rules too; only the summary matters here.
    logging.getLogger("ftops_monitor").setLevel(logging.ERROR)
    scenario = Scenario(
        rate=args.rate,
        weight=args.weight,
        error_rate=args.error_rate,
        base_error_rate=args.base_error_rate,
        slowdown=args.slowdown,
        max_error_rate=args.max_error_rate,
        evidence_mirror=args.evidence_mirror,
    )
    print(json.dumps(asyncio.run(simulate(scenario, args.runs, args.seed)), indent=2))


if __name__ == "__main__":
    main()
