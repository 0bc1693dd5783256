"""Opt-in fault injection (tests and benchmarks): make some requests fail or slow down,
optionally only for some versions, so a canary can be made to misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

from ftops_runtime.errors import Internal

T = TypeVar("T")


@dataclass
class Faults:
    error_rate: float = 0.0
    delay_factor: float = 1.0
    # Empty: every request (the base included); else only requests for these versions.
    versions: frozenset[str] = frozenset()
    rng: random.Random = field(default_factory=random.Random)

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.delay_factor > 1

    def applies(self, version_id: str) -> bool:
        return self.active and (not self.versions or version_id in self.versions)

    def before_first_token(self, version_id: str) -> None:
        if self.applies(version_id) and self.rng.random() < self.error_rate:
            # INTERNAL, as a version that fails on its own does: the monitor blames the
            # version for it (UNAVAILABLE would read as the platform's fault).
            raise Internal(f"injected fault (fault_error_rate={self.error_rate})")

    async def slowed(
        self, version_id: str, items: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        """Pass items through, each delayed by (factor - 1) x the time it took."""
        async with contextlib.aclosing(items):
            if not self.applies(version_id) or self.delay_factor <= 1:
                async for item in items:
                    yield item
                return
            last = time.perf_counter()
            async for item in items:
                took = time.perf_counter() - last
                await asyncio.sleep(took * (self.delay_factor - 1))
                yield item
                last = time.perf_counter()
