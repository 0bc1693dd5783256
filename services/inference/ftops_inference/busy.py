"""How busy the model is: the share of recent wall time its thread spent computing.

Free slots say nothing about headroom on a compute-bound replica: each extra row slows
every decode step of the batch, so best-effort (mirrored) traffic is admitted only while
the model has time to spare (``best_effort_max_busy``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class BusyMeter:
    """Busy intervals recorded by the model thread, read from the event loop."""

    def __init__(self, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._window = window_s
        self._clock = clock
        self._spans: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((start, end))
            self._trim(end)

    def _trim(self, now: float) -> None:
        while self._spans and self._spans[0][1] <= now - self._window:
            self._spans.popleft()

    def share(self) -> float:
        """Busy share of the last ``window_s`` (0..1)."""
        now = self._clock()
        since = now - self._window
        with self._lock:
            self._trim(now)
            busy = sum(min(end, now) - max(start, since) for start, end in self._spans)
        return min(1.0, max(0.0, busy / self._window))
