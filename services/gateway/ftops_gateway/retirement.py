"""Retires the version a final switch replaced once its hold time is over.

Every gateway replica runs this loop; a Redis lease decides which one publishes, the event
id is derived from (release, version) so that a retry after a crash is stored once by
JetStream, and the route records ``previous_retired`` by compare-and-set afterwards. A
version another alias still routes to (or holds) is not retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway import route_rules
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.route_store import RouteStore
from ftops_runtime.bus import EventBus
from ftops_runtime.events import ADAPTER_RETIRED, new_meta
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b0c8a52-3f59-4f7e-9a43-0d1f4b7c2e61")


def retire_event_id(release_id: str, version_id: str) -> str:
    return uuid.uuid5(_NAMESPACE, f"{release_id}/{version_id}").hex


class Retirer:
    def __init__(
        self,
        store: RouteStore,
        cache: RouteCache,
        bus: EventBus,
        *,
        owner: str,
        interval_s: float = 1.0,
        lease_s: float = 30.0,
    ) -> None:
        self._store = store
        self._cache = cache
        self._bus = bus
        self._owner = owner
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._task: asyncio.Task[None] | None = None
        self.retired: list[str] = []

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retire-held-versions")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            with contextlib.suppress(Exception):
                await self.run_once(time.time())

    async def run_once(self, now: float) -> int:
        """Retire every held version that is due; returns how many this replica retired."""
        done = 0
        routes = self._cache.routes()
        for route in routes:
            if not route_rules.retire_due(route, now):
                continue
            try:
                if await self._retire(route, routes, now):
                    done += 1
            except Exception as exc:
                log.warning(
                    "retiring %s of %s failed: %s", route.previous_version_id, route.alias, exc
                )
        return done

    async def _retire(
        self, route: gateway_pb2.Route, routes: list[gateway_pb2.Route], now: float
    ) -> bool:
        version = route.previous_version_id
        lease = f"retire:{route.alias}:{route.release_id}:{version}"
        if not await self._store.claim(lease, self._owner, self._lease_s):
            return False
        fresh = await self._store.get(route.alias)
        if fresh is None or not route_rules.retire_due(fresh, now):
            return False  # rolled back, re-promoted or already retired meanwhile
        in_use = any(
            version in route_rules.versions_in_use(other)
            for other in routes
            if other.alias != route.alias
        ) or version in {fresh.stable_version_id, fresh.candidate_version_id}
        published = False
        if not in_use:
            event = events_pb2.AdapterRetired(
                meta=new_meta(self._bus.service, self._bus.instance),
                version_id=version,
                reason=f"held {fresh.hold_seconds:.0f} s after {fresh.alias!r} switched to "
                f"{fresh.stable_version_id}",
                release_id=fresh.release_id,
            )
            event.meta.event_id = retire_event_id(fresh.release_id, version)
            await self._bus.publish(ADAPTER_RETIRED, event, timeout=5.0)
            published = True
            self.retired.append(version)
            log.info("retired %s (held for %s by %s)", version, fresh.alias, fresh.release_id)
        updated, _ = await self._store.update(
            route.alias, lambda cur: route_rules.mark_retired(cur, version)
        )
        if updated is not None:
            self._cache.put(updated)
        return published
