"""The startup heap freeze: objects alive at startup leave the collector's generations."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ftops_runtime.heap import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting as before


def test_objects_alive_at_startup_are_no_longer_scanned(unfrozen: None) -> None:
    startup_state = {"model": [object() for _ in range(10)]}
    frozen = freeze_startup_heap()

    assert frozen == gc.get_freeze_count() > 0
    tracked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert id(startup_state) not in tracked
    later = {"request": [1, 2]}
    assert id(later) in {id(o) for o in gc.get_objects(0)}
