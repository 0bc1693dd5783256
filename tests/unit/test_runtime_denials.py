"""ftops_runtime.denials without a network: refusals aggregated per source, key, method
and reason, never dropped (not by a flood, not by a failed flush), only key ids kept."""

from __future__ import annotations

import grpc
import pytest

from ftops.events.v1 import events_pb2
from ftops_runtime import denials
from ftops_runtime.denials import DenialRecorder
from ftops_runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


class _Sink:
    def __init__(self) -> None:
        self.batches: list[list[events_pb2.AccessDenied]] = []
        self.fail = False

    async def __call__(self, entries: list[events_pb2.AccessDenied]) -> None:
        if self.fail:
            raise ConnectionError("bus down")
        self.batches.append(entries)


async def test_a_flood_becomes_one_entry_per_source_and_reason_with_its_count() -> None:
    sink = _Sink()
    recorder = DenialRecorder("gateway", sink, interval_s=3600)
    for _ in range(5000):
        recorder.record(method="Generate", code=UNAUTH, reason="missing API key", source="10.0.0.7")
    recorder.record(method="Generate", code=UNAUTH, reason="missing API key", source="10.0.0.8")
    assert await recorder.flush() == 5001
    entries = sorted(sink.batches[0], key=lambda e: e.source)
    assert [(e.source, e.count, e.service) for e in entries] == [
        ("10.0.0.7", 5000, "gateway"),
        ("10.0.0.8", 1, "gateway"),
    ]
    assert entries[0].first_at.ToDatetime() <= entries[0].last_at.ToDatetime()
    await recorder.close()


async def test_too_many_distinct_refusals_are_counted_not_dropped() -> None:
    sink = _Sink()
    recorder = DenialRecorder("trainer", sink, interval_s=3600, max_distinct=10)
    for i in range(100):
        recorder.record(method="SubmitJob", code=UNAUTH, reason="unknown", key_id=f"{i:016x}")
    await recorder.flush()
    entries = sink.batches[0]
    assert len(entries) == 11
    assert sum(e.count for e in entries) == 100
    assert any(e.key_id == "*" and e.count == 90 for e in entries)
    await recorder.close()


async def test_a_failed_flush_keeps_its_refusals_for_the_next() -> None:
    sink = _Sink()
    recorder = DenialRecorder("monitor", sink, interval_s=3600)
    recorder.record(method="ListAlerts", code=UNAUTH, reason="r", source="s")
    sink.fail = True
    assert await recorder.flush() == 0
    recorder.record(method="ListAlerts", code=UNAUTH, reason="r", source="s")
    sink.fail = False
    assert await recorder.flush() == 2
    assert [e.count for e in sink.batches[-1]] == [2]
    await recorder.close()


async def test_exceptions_are_recorded_once_with_their_team_and_only_when_refusals() -> None:
    sink = _Sink()
    recorder = DenialRecorder("gateway", sink, interval_s=3600)
    refused = PermissionDenied("needs releaser")
    denials.tag(refused, team="alpha")
    assert recorder.record_exception(refused, method="SetRoute", key_id="a" * 16)
    assert not recorder.record_exception(refused, method="SetRoute")  # already recorded
    assert not recorder.record_exception(InvalidArgument("bad"), method="SetRoute")
    already = Unauthenticated("x")
    denials.mark_audited(already)
    assert not recorder.record_exception(already, method="Generate")
    await recorder.flush()
    [entry] = sink.batches[0]
    assert (entry.team, entry.code, entry.key_id, entry.method) == (
        "alpha",
        "PERMISSION_DENIED",
        "a" * 16,
        "SetRoute",
    )
    await recorder.close()


@pytest.mark.parametrize(
    ("presented", "key_id"),
    [
        ("ftk_0123456789abcdef_" + "s" * 43, "0123456789abcdef"),
        ("ftk_0123456789abcdef_short", "0123456789abcdef"),  # a bad secret still names its id
        ("sk-something-else", ""),
        ("", ""),
    ],
)
def test_only_the_key_id_is_ever_taken_from_a_key(presented: str, key_id: str) -> None:
    assert denials.key_id_of(presented) == key_id


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:10.1.2.3:51234", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("", ""),
    ],
)
def test_sources_are_hosts_without_ports(peer: str, source: str) -> None:
    assert denials.source_of(peer) == source
