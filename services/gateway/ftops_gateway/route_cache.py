"""Each replica's in-memory copy of the routing tables.

Requests are routed from this copy only, so a Redis outage does not stop traffic: the
last known table keeps serving. It is refreshed when a change is announced on the
``ftops:routes`` channel and, as a safety net for missed messages, every
``refresh_s`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ftops.gateway.v1 import gateway_pb2
from ftops_gateway.route_store import RouteStore
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class RouteCache:
    def __init__(self, store: RouteStore, *, refresh_s: float = 1.0) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._routes: dict[str, gateway_pb2.Route] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: dict[str, set[asyncio.Queue[gateway_pb2.Route]]] = {}
        self.last_refresh_ok = False

    def get(self, alias: str) -> gateway_pb2.Route | None:
        return self._routes.get(alias)

    def put(self, route: gateway_pb2.Route) -> None:
        """Keep the newer of the cached and the given route (by revision); watchers of
        the alias get every newer revision."""
        known = self._routes.get(route.alias)
        if known is None or route.revision >= known.revision:
            self._routes[route.alias] = route
        if known is None or route.revision > known.revision:
            for queue in self._watchers.get(route.alias, ()):
                queue.put_nowait(route)

    def routes(self) -> list[gateway_pb2.Route]:
        return list(self._routes.values())

    def watch(self, alias: str) -> asyncio.Queue[gateway_pb2.Route]:
        """A queue receiving every newer revision of the alias's route; ``unwatch`` it."""
        queue: asyncio.Queue[gateway_pb2.Route] = asyncio.Queue()
        self._watchers.setdefault(alias, set()).add(queue)
        return queue

    def unwatch(self, alias: str, queue: asyncio.Queue[gateway_pb2.Route]) -> None:
        watchers = self._watchers.get(alias)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[alias]

    async def lookup(self, alias: str) -> gateway_pb2.Route | None:
        """The cached route, else a direct read (an alias created moments ago elsewhere).
        A Redis failure counts as "not known here"; while reloads fail, Redis is not
        asked at all, so requests naming versions do not wait on its timeout."""
        route = self._routes.get(alias)
        if route is not None or not self.last_refresh_ok:
            return route
        try:
            route = await self._store.get(alias)
        except Exception as exc:
            log.debug("route lookup of %s failed: %s", alias, exc)
            return None
        if route is not None:
            self.put(route)
        return route

    async def refresh(self) -> bool:
        try:
            routes = await self._store.load_all()
        except Exception as exc:
            if self.last_refresh_ok:
                log.warning("cannot reload routes from Redis (%s); serving the last table", exc)
            self.last_refresh_ok = False
            return False
        for route in routes.values():
            self.put(route)
        self.last_refresh_ok = True
        return True

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="route-refresh"),
            asyncio.create_task(self._listen_loop(), name="route-listen"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def _listen_loop(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("route channel subscription lost: %s", exc)
            await asyncio.sleep(self._refresh_s)

    async def _listen(self) -> None:
        pubsub = self._store.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._store.channel)
            # Changes made while we were not subscribed.
            await self.refresh()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                data = message.get("data")
                text = data.decode() if isinstance(data, bytes) else str(data)
                alias = text.split(" ", 1)[0]
                route = await self._store.get(alias)
                if route is not None:
                    self.put(route)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
