"""How many messages the event bus asks for in its next pull."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ftops_runtime.bus import next_fetch_size


def _msg(pending: int | None) -> Any:
    metadata = None if pending is None else SimpleNamespace(num_pending=pending)
    return SimpleNamespace(metadata=metadata)


def test_one_when_nothing_is_queued_so_a_lone_event_is_not_held() -> None:
    assert next_fetch_size(16, []) == 1
    assert next_fetch_size(16, [_msg(3), _msg(0)]) == 1
    assert next_fetch_size(16, [_msg(None)]) == 1


def test_what_is_queued_up_to_the_batch() -> None:
    assert next_fetch_size(16, [_msg(5)]) == 5
    assert next_fetch_size(16, [_msg(500)]) == 16
    assert next_fetch_size(1, [_msg(500)]) == 1
