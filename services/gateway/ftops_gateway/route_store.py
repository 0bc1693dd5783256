"""Routing tables in Redis, shared by every gateway replica.

Layout:
  ``ftops:route:<alias>``    the Route as protobuf JSON (``revision`` bumps on each change)
  ``ftops:event:<event_id>`` dedupe marker of an applied release decision (with TTL)
  ``ftops:claim:<name>``     a short lease: which replica does a once-only job (retiring)
  channel ``ftops:routes``   "<alias> <revision>" announced after each change

Changes are read-modify-write under WATCH/MULTI, so two replicas applying decisions at
once never lose one, and the dedupe marker is written in the same transaction as the
route so a decision is applied exactly once even when delivered twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis.asyncio as redis
from google.protobuf import json_format
from redis.exceptions import WatchError

from ftops.gateway.v1 import gateway_pb2

log = logging.getLogger(__name__)

ROUTE_PREFIX = "ftops:route:"
EVENT_PREFIX = "ftops:event:"
CLAIM_PREFIX = "ftops:claim:"
ROUTES_CHANNEL = "ftops:routes"

# Returns the new route, or None to leave it unchanged.
Mutation = Callable[[gateway_pb2.Route | None], gateway_pb2.Route | None]


def route_key(alias: str) -> str:
    return f"{ROUTE_PREFIX}{alias}"


def encode(route: gateway_pb2.Route) -> str:
    return json_format.MessageToJson(route, preserving_proto_field_name=True, indent=None)


def decode(raw: str | bytes) -> gateway_pb2.Route:
    return json_format.Parse(raw, gateway_pb2.Route())


class RouteStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        dedupe_ttl_s: int = 7 * 24 * 3600,
        key_prefix: str = "",
    ) -> None:
        """``key_prefix`` is the installation namespace's (``Namespace.redis_prefix``): it
        goes before every key and the channel, so installations sharing a Redis never
        read or announce each other's routes."""
        self.redis = client
        self._dedupe_ttl_s = dedupe_ttl_s
        self._prefix = key_prefix
        self.channel = key_prefix + ROUTES_CHANNEL

    def _route_key(self, alias: str) -> str:
        return self._prefix + route_key(alias)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def get(self, alias: str) -> gateway_pb2.Route | None:
        raw = await self.redis.get(self._route_key(alias))
        return decode(raw) if raw is not None else None

    async def load_all(self) -> dict[str, gateway_pb2.Route]:
        pattern = f"{self._prefix}{ROUTE_PREFIX}*"
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=500)]
        if not keys:
            return {}
        values = await self.redis.mget(keys)
        routes: dict[str, gateway_pb2.Route] = {}
        for raw in values:
            if raw is None:
                continue
            route = decode(raw)
            routes[route.alias] = route
        return routes

    async def claim(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease ``name`` unless another owner holds it (it expires after
        ``ttl_s``, so a replica that dies holding it does not block the job forever)."""
        key = f"{self._prefix}{CLAIM_PREFIX}{name}"
        if await self.redis.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return True
        held = await self.redis.get(key)
        return held is not None and (held.decode() if isinstance(held, bytes) else held) == owner

    async def update(
        self, alias: str, mutate: Mutation, *, event_id: str = ""
    ) -> tuple[gateway_pb2.Route | None, bool]:
        """Apply ``mutate`` atomically. Returns (route after, changed).

        With ``event_id``, an already applied event changes nothing (and is not mutated
        again); the marker is set even when the mutation ignores the event. An exception
        from ``mutate`` (a refused command) leaves everything as it was."""
        key = self._route_key(alias)
        marker = f"{self._prefix}{EVENT_PREFIX}{event_id}" if event_id else ""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    watched = [key, marker] if marker else [key]
                    await pipe.watch(*watched)
                    if marker and await pipe.exists(marker):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return await self.get(alias), False
                    raw = await pipe.get(key)
                    current = decode(raw) if raw is not None else None
                    new = mutate(current)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if new is not None:
                        new.alias = alias
                        new.revision = (current.revision if current else 0) + 1
                        pipe.set(key, encode(new))
                    if marker:
                        pipe.set(marker, "1", ex=self._dedupe_ttl_s)
                    await pipe.execute()
                except WatchError:
                    continue
                break
        if new is None:
            return current, False
        await self.redis.publish(self.channel, f"{alias} {new.revision}")
        return new, True
