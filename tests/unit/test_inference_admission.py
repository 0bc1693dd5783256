"""The replica's admission: a bounded FIFO queue in front of the batch, refusals that say
how long to wait, deadlines, best-effort traffic and drain."""

from __future__ import annotations

import asyncio

import pytest

from ftops_inference.admission import Admission, AdmissionLimits, Slot
from ftops_inference.busy import BusyMeter
from ftops_runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock | None = None, **limits: float) -> Admission:
    values = {"max_running": 1, "max_queue_length": 8, "max_queue_wait_s": 10.0}
    values.update(limits)
    return Admission(
        AdmissionLimits(
            max_running=int(values["max_running"]),
            max_queue_length=int(values["max_queue_length"]),
            max_queue_wait_s=values["max_queue_wait_s"],
            best_effort_reserve=int(values.get("best_effort_reserve", 0)),
            max_best_effort=int(values.get("max_best_effort", 0)),
        ),
        clock=clock or Clock(),
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def learn_service_time(gate: Admission, clock: Clock, seconds: float) -> None:
    """One completed request that held its slot ``seconds``."""
    slot = Slot(best_effort=False, started=clock.now)
    gate._running += 1  # as if acquired
    clock.now += seconds
    gate.release(slot, completed=True)


async def test_waiters_get_slots_in_arrival_order() -> None:
    gate = admission(max_running=1)
    first = await gate.acquire()
    order: list[str] = []

    async def user(name: str) -> Slot:
        slot = await gate.acquire()
        order.append(name)
        return slot

    tasks = [asyncio.create_task(user(name)) for name in "abc"]
    await settle()
    assert (gate.running, gate.waiting, gate.in_flight) == (1, 3, 4)
    gate.release(first, completed=True)
    for task in tasks:
        gate.release(await task, completed=True)
    assert order == ["a", "b", "c"]
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_full_queue_refuses_at_once_with_retry_advice() -> None:
    clock = Clock()
    gate = admission(clock, max_running=2, max_queue_length=1)
    learn_service_time(gate, clock, 0.4)
    running = [await gate.acquire(), await gate.acquire()]
    waiting = asyncio.create_task(gate.acquire())
    await settle()
    with pytest.raises(ResourceExhausted, match="max_queue_length=1") as refused:
        await gate.acquire()
    # One ahead on 2 slots of 0.4 s each: about 0.4 s.
    assert refused.value.retry_after_ms == 400
    for slot in running:
        gate.release(slot, completed=False)
    gate.release(await waiting, completed=False)


async def test_an_expected_wait_over_the_limit_is_refused() -> None:
    clock = Clock()
    gate = admission(clock, max_running=2, max_queue_length=10, max_queue_wait_s=1.0)
    learn_service_time(gate, clock, 1.0)
    assert gate.service_time_s == 1.0
    held = [await gate.acquire(), await gate.acquire()]
    # 0.5 s and 1.0 s expected: queued.
    queued = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await settle()
    assert gate.waiting == 2
    with pytest.raises(ResourceExhausted, match=r"expected wait .* is 1\.50s .*max_queue_wait_s"):
        await gate.acquire()
    assert gate.waiting == 2
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    for slot in held:
        gate.release(slot, completed=False)


async def test_a_deadline_shorter_than_the_wait_is_refused_at_once() -> None:
    clock = Clock()
    gate = admission(clock, max_running=1)
    learn_service_time(gate, clock, 0.5)
    held = await gate.acquire()
    with pytest.raises(ResourceExhausted, match=r"deadline \(0\.200s left\) is shorter") as info:
        await gate.acquire(timeout_s=0.2)
    assert info.value.retry_after_ms == 500
    assert gate.waiting == 0  # never queued
    with pytest.raises(DeadlineExceeded, match="deadline passed before"):
        await gate.acquire(timeout_s=0.0)
    gate.release(held, completed=False)


async def test_a_deadline_that_passes_while_waiting_leaves_the_queue() -> None:
    gate = admission(max_running=1)  # no service time known yet: waits look short
    held = await gate.acquire()
    with pytest.raises(DeadlineExceeded, match="deadline passed after"):
        await gate.acquire(timeout_s=0.05)
    assert gate.waiting == 0
    gate.release(held, completed=False)
    assert gate.running == 0


async def test_a_cancelled_waiter_leaves_and_the_next_one_gets_the_slot() -> None:
    gate = admission(max_running=1)
    held = await gate.acquire()
    gone = asyncio.create_task(gate.acquire())
    stays = asyncio.create_task(gate.acquire())
    await settle()
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 1
    gate.release(held, completed=False)
    slot = await asyncio.wait_for(stays, 1)
    gate.release(slot, completed=False)
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_slot_handed_to_a_waiter_that_just_left_goes_to_the_next() -> None:
    gate = admission(max_running=1)
    held = await gate.acquire()
    gone = asyncio.create_task(gate.acquire())
    stays = asyncio.create_task(gate.acquire())
    await settle()
    gate.release(held, completed=False)  # the slot is handed to `gone`...
    gone.cancel()  # ...which is cancelled before it resumes
    await asyncio.gather(gone, return_exceptions=True)
    slot = await asyncio.wait_for(stays, 1)
    gate.release(slot, completed=False)
    assert (gate.running, gate.waiting) == (0, 0)


async def test_best_effort_uses_spare_compute_only() -> None:
    share = [0.5]
    gate = Admission(
        AdmissionLimits(max_running=8, best_effort_max_busy=0.8), busy=lambda: share[0]
    )
    mirror = await gate.acquire(best_effort=True)
    gate.release(mirror, completed=True)
    share[0] = 0.85  # the model computed 85% of the last second: no room for mirrors
    with pytest.raises(ResourceExhausted, match="busy 85% of the last second") as refused:
        await gate.acquire(best_effort=True)
    assert refused.value.retry_after_ms > 0
    user = await gate.acquire()  # user requests are never refused for it
    gate.release(user, completed=True)


def test_busy_meter_measures_the_share_of_the_last_window() -> None:
    now = [10.0]
    meter = BusyMeter(window_s=1.0, clock=lambda: now[0])
    assert meter.share() == 0.0
    meter.add(9.2, 9.5)
    meter.add(9.6, 10.0)
    assert meter.share() == pytest.approx(0.7)
    now[0] = 10.5  # half the window has passed: 9.5-10.0 remains, 0.4 of it busy
    assert meter.share() == pytest.approx(0.4)
    now[0] = 11.5
    assert meter.share() == 0.0


async def test_best_effort_runs_at_most_its_cap_at_once_whatever_slots_are_free() -> None:
    gate = admission(max_running=8, max_best_effort=1)
    mirror = await gate.acquire(best_effort=True)
    with pytest.raises(ResourceExhausted, match="at most 1 at once"):
        await gate.acquire(best_effort=True)
    users = [await gate.acquire() for _ in range(3)]  # user requests are not capped by it
    gate.release(mirror, completed=True)
    again = await gate.acquire(best_effort=True)  # its turn once the first one is done
    for slot in [again, *users]:
        gate.release(slot, completed=False)


async def test_best_effort_never_waits_and_never_takes_a_reserved_slot() -> None:
    gate = admission(max_running=4, best_effort_reserve=2)
    mirrors = [await gate.acquire(best_effort=True), await gate.acquire(best_effort=True)]
    # Two of four slots are kept for user requests.
    with pytest.raises(ResourceExhausted, match=r"best-effort .* never queues") as refused:
        await gate.acquire(best_effort=True)
    assert refused.value.retry_after_ms > 0
    users = [await gate.acquire(), await gate.acquire()]
    assert gate.running == 4
    for slot in [*mirrors, *users]:
        gate.release(slot, completed=False)
    # A user request waiting: best-effort ones are refused even with a slot free.
    held = [await gate.acquire() for _ in range(4)]
    waiting = asyncio.create_task(gate.acquire())
    await settle()
    gate.release(held.pop(), completed=False)  # straight to the waiter
    gate.release(await waiting, completed=False)
    held.append(await gate.acquire())
    waiting = asyncio.create_task(gate.acquire())
    await settle()
    with pytest.raises(ResourceExhausted, match="1 waiting"):
        await gate.acquire(best_effort=True)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    for slot in held:
        gate.release(slot, completed=False)


async def test_a_user_request_drops_a_running_best_effort_one() -> None:
    gate = admission(max_running=2)
    user = await gate.acquire()
    mirror_slot: list[Slot] = []

    async def mirror() -> None:
        slot = await gate.acquire(best_effort=True)
        mirror_slot.append(slot)
        try:
            await asyncio.sleep(30)  # a long generation
        finally:
            gate.release(slot, completed=False)

    mirroring = asyncio.create_task(mirror())
    await settle()
    assert gate.running == 2
    # The user request does not wait behind the mirror: the mirror is dropped for it.
    second = await asyncio.wait_for(gate.acquire(), 1)
    with pytest.raises(asyncio.CancelledError):
        await mirroring
    assert mirror_slot[0].dropped
    assert (gate.running, gate.waiting) == (2, 0)
    gate.release(second, completed=False)
    gate.release(user, completed=False)
    assert gate.running == 0


async def test_drain_serves_the_waiting_then_refuses_what_is_left() -> None:
    gate = admission(max_running=1)
    held = await gate.acquire()
    served = asyncio.create_task(gate.acquire())
    refused = asyncio.create_task(gate.acquire())
    await settle()
    gate.draining = True
    with pytest.raises(Unavailable, match="draining"):
        await gate.acquire()
    with pytest.raises(Unavailable, match="draining"):
        await gate.acquire(best_effort=True)
    idle = asyncio.create_task(gate.wait_idle())
    gate.release(held, completed=False)
    slot = await asyncio.wait_for(served, 1)  # a waiting request is still served
    assert gate.refuse_waiting("stopping; retry on another") == 1
    with pytest.raises(Unavailable, match="stopping") as info:
        await refused
    assert info.value.retry_after_ms > 0
    assert not idle.done()
    gate.release(slot, completed=False)
    await asyncio.wait_for(idle, 1)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"max_queue_length": -1}, "max_queue_length"),
        ({"max_queue_wait_s": -0.5}, "max_queue_wait_s"),
        ({"max_queue_length": 8, "max_queue_wait_s": 0}, "max_queue_wait_s is 0"),
        ({"best_effort_reserve_share": 1.0}, "best_effort_reserve_share must be"),
        ({"best_effort_reserve_share": -0.1}, "best_effort_reserve_share must be"),
    ],
)
def test_bad_queue_settings_are_refused_with_their_name(
    values: dict[str, float], named: str
) -> None:
    from pydantic import ValidationError

    from ftops_inference.settings import InferenceSettings

    with pytest.raises(ValidationError, match=named):
        InferenceSettings(**values)  # type: ignore[arg-type]


def test_queue_settings_that_make_sense_are_taken() -> None:
    from ftops_inference.settings import InferenceSettings

    assert InferenceSettings(max_queue_length=0, max_queue_wait_s=0).max_queue_length == 0
    settings = InferenceSettings(max_concurrent_requests=16, best_effort_reserve_share=0.25)
    assert settings.best_effort_reserve() == 4
