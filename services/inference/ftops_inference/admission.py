"""Admission in front of the batch: who runs now, who waits, who is refused.

``max_running`` generations run at once (``max_concurrent_requests``). A user request
beyond that waits in a bounded FIFO queue, as vLLM and TGI keep one in front of their
batch, instead of being refused at the first burst. It is refused at once (with how long
to wait before retrying) when the queue is full, when its expected wait is over
``max_queue_wait_s``, or when its caller's deadline is shorter than that wait: a request
is never left to time out in the queue. The expected wait comes from the recent service
time of a request (an exponential average of completed ones) and the position in the
queue: ``(ahead + 1) x service time / max_running``.

Best-effort requests (mirrored and shadow traffic nobody waits for) never wait: one runs
only when no user request waits and a slot is free beyond ``best_effort_reserve`` (slots
kept for user traffic). A user request that has to wait while best-effort ones run drops
one of them (it ends RESOURCE_EXHAUSTED), so best-effort traffic never holds a slot a
user request needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import metrics

from ftops_runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable

# Weight of the newest completed request in the service-time average: about the last 10
# requests count, so the estimate follows a change of load within a second or two.
SERVICE_TIME_WEIGHT = 0.2
# Retry advice when nothing is known about service times yet.
DEFAULT_RETRY_MS = 100

_meter = metrics.get_meter("ftops.inference")
_refusals = _meter.create_counter(
    "ftops.inference.admission_refusals",
    unit="{request}",
    description="Requests refused or dropped by admission, by reason and priority",
)
_queue_wait = _meter.create_histogram(
    "ftops.inference.queue_wait", unit="s", description="Time user requests waited for a slot"
)


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int
    max_queue_length: int = 0
    max_queue_wait_s: float = 0.0
    best_effort_reserve: int = 0
    # Best-effort requests running at once (0: only the reserve limits them). On a
    # compute-bound replica every extra row slows each decode step of the whole batch, so
    # free slots alone would let mirrored traffic take the users' latency.
    max_best_effort: int = 0
    # Best-effort requests are refused while the model's busy share (``busy``) is at or
    # above this (1.0: never for that reason).
    best_effort_max_busy: float = 1.0


@dataclass(eq=False)
class Slot:
    """One running request's place in the batch; released exactly once."""

    best_effort: bool
    started: float
    # The task running a best-effort request: cancelled when a user request needs the slot.
    task: asyncio.Task[object] | None = None
    dropped: bool = False


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Slot]
    queued_at: float = field(default=0.0)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(round(seconds * 1000, 6)))


class Admission:
    def __init__(
        self,
        limits: AdmissionLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        busy: Callable[[], float] | None = None,
    ):
        self.limits = limits
        self._clock = clock
        self._busy = busy
        self._running = 0
        self._waiting: deque[_Waiter] = deque()
        self._best_effort: list[Slot] = []  # running, not dropped
        self._dropping = 0  # dropped best-effort slots not released yet
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        # Seconds a completed request held its slot (exponential average); None = no
        # request completed yet, when waits are assumed short.
        self.service_time_s: float | None = None

    # -- state -----------------------------------------------------------------------

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Running and waiting: every request admitted and not finished."""
        return self._running + len(self._waiting)

    async def wait_idle(self) -> None:
        """Until nothing runs or waits (drain)."""
        await self._idle.wait()

    def expected_wait_s(self, ahead: int) -> float:
        """How long a request with ``ahead`` user requests before it in the queue should
        wait for a slot, from the recent service time (0 while none is known)."""
        if self.service_time_s is None or ahead < 0:
            return 0.0
        return (ahead + 1) * self.service_time_s / self.limits.max_running

    def retry_after_ms(self) -> int:
        """Retry advice for a request refused now: about one slot's turn."""
        return self._retry_ms(0.0)

    def _retry_ms(self, wait_s: float) -> int:
        if wait_s > 0:
            return _ms(wait_s)
        if self.service_time_s is not None:
            return _ms(self.service_time_s / self.limits.max_running)
        return DEFAULT_RETRY_MS

    # -- admission -------------------------------------------------------------------

    async def acquire(self, *, best_effort: bool = False, timeout_s: float | None = None) -> Slot:
        """A slot for one request, now or after waiting its turn; raises
        ResourceExhausted (with retry advice), DeadlineExceeded or Unavailable."""
        if self.draining:
            raise Unavailable(
                "this replica is draining for shutdown; retry on another",
                retry_after_ms=DEFAULT_RETRY_MS,
            )
        if best_effort:
            return self._acquire_best_effort()
        if timeout_s is not None and timeout_s <= 0:
            _refusals.add(1, {"reason": "deadline", "priority": "user"})
            raise DeadlineExceeded("the request's deadline passed before it reached a slot")
        if self._running < self.limits.max_running and not self._waiting:
            return self._take(best_effort=False)
        return await self._wait_turn(timeout_s)

    def _take(self, *, best_effort: bool) -> Slot:
        self._running += 1
        self._idle.clear()
        slot = Slot(best_effort=best_effort, started=self._clock())
        if best_effort:
            slot.task = asyncio.current_task()
            self._best_effort.append(slot)
        return slot

    def _acquire_best_effort(self) -> Slot:
        limit = self.limits.max_running - self.limits.best_effort_reserve
        cap = self.limits.max_best_effort
        busy = self._busy() if self._busy is not None else 0.0
        if busy >= self.limits.best_effort_max_busy:
            _refusals.add(1, {"reason": "busy", "priority": "best_effort"})
            raise ResourceExhausted(
                f"best-effort request refused: the model was busy {busy:.0%} of the last "
                f"second (best_effort_max_busy={self.limits.best_effort_max_busy:g}); "
                "mirrored traffic only uses spare compute",
                retry_after_ms=self._retry_ms(0.0),
            )
        if self._waiting or self._running >= limit or (cap and len(self._best_effort) >= cap):
            _refusals.add(1, {"reason": "busy", "priority": "best_effort"})
            raise ResourceExhausted(
                f"best-effort request refused: {self._running} running, "
                f"{len(self._waiting)} waiting; best-effort traffic runs only on the "
                f"{max(limit, 0)} of {self.limits.max_running} slots not kept for user "
                f"requests, at most {cap or limit} at once, and never queues",
                retry_after_ms=self._retry_ms(0.0),
            )
        return self._take(best_effort=True)

    async def _wait_turn(self, timeout_s: float | None) -> Slot:
        limits = self.limits
        ahead = len(self._waiting)
        # Best-effort requests still running give their slots to waiting ones at once.
        droppable = len(self._best_effort)
        wait_s = self.expected_wait_s(ahead - droppable)
        if ahead >= limits.max_queue_length:
            _refusals.add(1, {"reason": "queue_full", "priority": "user"})
            raise ResourceExhausted(
                f"{self._running} requests running (the limit is {limits.max_running}) and "
                f"{ahead} waiting (max_queue_length={limits.max_queue_length}); retry in "
                f"~{wait_s:.2f}s or on another replica",
                retry_after_ms=self._retry_ms(wait_s),
            )
        if wait_s > limits.max_queue_wait_s:
            _refusals.add(1, {"reason": "queue_wait", "priority": "user"})
            excess = wait_s - limits.max_queue_wait_s
            raise ResourceExhausted(
                f"expected wait for a slot is {wait_s:.2f}s ({ahead} requests ahead), over "
                f"the limit of {limits.max_queue_wait_s:g}s (max_queue_wait_s); retry in "
                f"~{excess:.2f}s or on another replica",
                retry_after_ms=self._retry_ms(excess),
            )
        if timeout_s is not None and wait_s > timeout_s:
            _refusals.add(1, {"reason": "deadline", "priority": "user"})
            raise ResourceExhausted(
                f"the request's deadline ({timeout_s:.3f}s left) is shorter than its expected "
                f"wait for a slot ({wait_s:.3f}s, {ahead} requests ahead); refused at once "
                "rather than left to time out in the queue",
                retry_after_ms=self._retry_ms(wait_s),
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self._clock())
        self._waiting.append(waiter)
        self._idle.clear()
        self._drop_best_effort()
        try:
            async with asyncio.timeout(timeout_s):
                slot = await waiter.future
        except TimeoutError:
            self._leave(waiter)
            _refusals.add(1, {"reason": "deadline", "priority": "user"})
            raise DeadlineExceeded(
                f"the request's deadline passed after {self._clock() - waiter.queued_at:.3f}s "
                "waiting for a slot"
            ) from None
        except BaseException:
            # The caller went away (or the queue was refused): leave without a trace.
            self._leave(waiter)
            raise
        _queue_wait.record(self._clock() - waiter.queued_at)
        return slot

    def _leave(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            # Handed a slot in the same instant it gave up: pass the slot on.
            self.release(future.result(), completed=False)
        elif not future.done():
            future.cancel()
        self._check_idle()

    def _drop_best_effort(self) -> None:
        """Drop running best-effort requests until every waiting user request has a slot
        coming (they are cancelled; their slots go to the queue's head as they unwind)."""
        while self._best_effort and self._dropping < len(self._waiting):
            slot = self._best_effort.pop()  # the newest: it has done the least work
            slot.dropped = True
            self._dropping += 1
            _refusals.add(1, {"reason": "dropped", "priority": "best_effort"})
            if slot.task is not None:
                slot.task.cancel("dropped for a user request")

    def release(self, slot: Slot, *, completed: bool) -> None:
        """The request is over; ``completed`` requests feed the service-time estimate."""
        if slot.best_effort:
            if slot.dropped:
                self._dropping -= 1
            else:
                with contextlib.suppress(ValueError):
                    self._best_effort.remove(slot)
        if completed:
            held = self._clock() - slot.started
            previous = self.service_time_s
            self.service_time_s = (
                held if previous is None else previous + SERVICE_TIME_WEIGHT * (held - previous)
            )
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.future.done():
                # The slot passes straight to the head of the queue: no one can jump it.
                waiter.future.set_result(Slot(best_effort=False, started=self._clock()))
                return
        self._running -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if self._running == 0 and not self._waiting:
            self._idle.set()

    def refuse_waiting(self, reason: str) -> int:
        """Refuse every waiting request with UNAVAILABLE (the drain ran out of time); they
        produced nothing, so the caller may retry them on another replica."""
        refused = 0
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(Unavailable(reason, retry_after_ms=DEFAULT_RETRY_MS))
                refused += 1
        self._check_idle()
        return refused
