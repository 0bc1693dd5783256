"""Where each adapter version lives: in the model (at most ``max_loaded``, LRU), in a CPU
cache of verified weights (at most ``max_cached``, LRU), or only on disk in the verified
artifact cache.

A request pins its version from admission to its last token: a pinned version is never
evicted, so in-flight requests finish on the weights they started with. A request for a
version that is not in the model brings it back (from CPU or disk: a counted reload),
evicting the least recently used unpinned version; when every slot is pinned it waits for
one to be released. Retiring a version waits for its pins, then drops it from every tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from ftops_runtime.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

W = TypeVar("W")  # a backend's in-memory adapter weights


@dataclass
class VersionStats:
    loads: int = 0
    reloads: int = 0
    evictions: int = 0


@dataclass
class Tiers(Generic[W]):
    """The operations a backend provides; attach/detach run on its model thread."""

    read: Callable[[Path], Awaitable[W]]  # disk -> CPU weights (verified files)
    attach: Callable[[str, W], Awaitable[None]]  # CPU weights -> model
    detach: Callable[[str], Awaitable[W]]  # model -> CPU weights, freeing the model's copy
    remove: Callable[[str], Awaitable[None]]  # out of the model for good (no copy kept)
    drop: Callable[[], None] = field(default=lambda: None)  # give freed memory back


class Residency(Generic[W]):
    def __init__(self, tiers: Tiers[W], *, max_loaded: int, max_cached: int) -> None:
        self._tiers = tiers
        self.max_loaded = max_loaded
        self.max_cached = max_cached
        self._model: OrderedDict[str, None] = OrderedDict()  # LRU first
        self._cpu: OrderedDict[str, W] = OrderedDict()
        self._dirs: dict[str, Path] = {}
        self._pins: Counter[str] = Counter()
        self._retiring: set[str] = set()
        self._cond = asyncio.Condition()
        self.stats: dict[str, VersionStats] = {}
        self.on_change: Callable[[], None] = lambda: None
        # (version, "load" | "reload" | "evict" | "unload") for metrics.
        self.on_event: Callable[[str, str], None] = lambda version, event: None

    # -- views -----------------------------------------------------------------------

    def loaded(self) -> list[str]:
        return list(self._model)

    def cached(self) -> list[str]:
        return list(self._cpu)

    def known(self) -> list[str]:
        return list(self._dirs)

    def pins(self, version_id: str) -> int:
        return self._pins[version_id]

    def tier(self, version_id: str) -> str:
        if version_id in self._model:
            return "model"
        if version_id in self._cpu:
            return "cpu"
        return "disk" if version_id in self._dirs else ""

    # -- operations ------------------------------------------------------------------

    async def add(self, version_id: str, adapter_dir: Path) -> None:
        """A newly verified version: bring it into the model now (new versions are
        about to get traffic). Adding a known version again changes nothing."""
        async with self._cond:
            if version_id in self._dirs:
                return
            self._dirs[version_id] = adapter_dir
            self.stats.setdefault(version_id, VersionStats())
            try:
                await self._bring_in(version_id)
            except BaseException:
                self._dirs.pop(version_id, None)
                raise
            self.on_event(version_id, "load")

    @contextlib.asynccontextmanager
    async def use(self, version_id: str) -> AsyncIterator[None]:
        """Pin ``version_id`` in the model for the duration of a request."""
        await self.acquire(version_id)
        try:
            yield
        finally:
            await self.release(version_id)

    async def acquire(self, version_id: str) -> None:
        async with self._cond:
            self._check_servable(version_id)
            while version_id not in self._model and not self._has_room():
                await self._cond.wait()
                self._check_servable(version_id)
            if version_id in self._model:
                self._model.move_to_end(version_id)
            else:
                await self._bring_in(version_id)
                self.stats[version_id].reloads += 1
                self.on_event(version_id, "reload")
                log.info("reloaded adapter version %s on demand", version_id)
            self._pins[version_id] += 1

    async def release(self, version_id: str) -> None:
        async with self._cond:
            self._pins[version_id] -= 1
            if self._pins[version_id] <= 0:
                del self._pins[version_id]
                self._cond.notify_all()

    async def retire(self, version_id: str) -> None:
        """Drop a version from every tier once no request uses it any more."""
        async with self._cond:
            if version_id not in self._dirs:
                raise NotFound(f"adapter version {version_id} is not loaded")
            self._retiring.add(version_id)
            try:
                await self._cond.wait_for(lambda: self._pins[version_id] == 0)
                if version_id in self._model:
                    await self._tiers.remove(version_id)
                    del self._model[version_id]
                self._cpu.pop(version_id, None)
                del self._dirs[version_id]
            finally:
                self._retiring.discard(version_id)
                self._cond.notify_all()
        self._tiers.drop()
        self.on_event(version_id, "unload")
        self.on_change()

    # -- internals (callers hold the condition's lock) --------------------------------

    def _check_servable(self, version_id: str) -> None:
        if version_id in self._retiring:
            raise FailedPrecondition(f"adapter version {version_id} is being unloaded")
        if version_id not in self._dirs:
            raise FailedPrecondition(f"adapter version {version_id} was unloaded meanwhile")

    def _has_room(self) -> bool:
        return len(self._model) < self.max_loaded or any(self._pins[v] == 0 for v in self._model)

    async def _bring_in(self, version_id: str) -> None:
        # Taken out of the CPU tier first, so the victim moving in cannot push it out.
        cached = self._cpu.pop(version_id, None)
        evicted = False
        while len(self._model) >= self.max_loaded:
            if not self._has_room():
                await self._cond.wait()
                continue
            victim = next(v for v in self._model if self._pins[v] == 0)
            weights = await self._tiers.detach(victim)
            del self._model[victim]
            self.stats[victim].evictions += 1
            self.on_event(victim, "evict")
            self._cache(victim, weights)
            evicted = True
            log.info("evicted adapter version %s from the model", victim)
        weights = cached if cached is not None else await self._tiers.read(self._dirs[version_id])
        await self._tiers.attach(version_id, weights)
        del weights  # the model holds its own copy now
        self._model[version_id] = None
        self.stats[version_id].loads += 1
        if evicted:
            self._tiers.drop()
        self.on_change()

    def _cache(self, version_id: str, weights: W) -> None:
        if self.max_cached <= 0:
            return
        self._cpu[version_id] = weights
        while len(self._cpu) > self.max_cached:
            dropped, _ = self._cpu.popitem(last=False)
            log.debug("adapter version %s left the CPU cache (still on disk)", dropped)
