"""Readable names for the dashboard's series: ``alias:vN`` instead of ``ver_...`` ids.

A version's adapter and number come from the registry (``GetVersion``), asked once per
version in the background and remembered (a version never changes either). Traffic sent
straight to a version id (no alias) is grouped under its adapter's name, so it sits with
the alias of the same name rather than in a group of its own. Until the registry has
answered, a series is named by its id; while the registry cannot be reached it is asked
again only after a pause, so a registry outage costs the monitor nothing per tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BASE_LABEL = "base model"
# Traffic to version ids the registry has not named (yet).
UNNAMED_GROUP = "direct to versions"
# Seconds before asking again: after the registry could not be reached, or did not know
# the version (it may be registered later, or it is a stranger's id).
RETRY_UNAVAILABLE_S = 30.0
RETRY_UNKNOWN_S = 300.0
# Lookups per background round: a burst of new versions is named over a few ticks.
LOOKUPS_PER_ROUND = 64


@dataclass(frozen=True, slots=True)
class VersionName:
    adapter: str
    number: int


# version_id -> its name; None when the registry does not know it. Raises ConnectionError
# when the registry cannot be asked.
NameLookup = Callable[[str], Awaitable[VersionName | None]]


def registry_names(
    stub: registry_pb2_grpc.RegistryServiceStub, *, timeout_s: float = 5.0
) -> NameLookup:
    async def lookup(version_id: str) -> VersionName | None:
        try:
            version = await stub.GetVersion(
                registry_pb2.GetVersionRequest(version_id=version_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise ConnectionError(f"{err.code().name}: {err.details()}") from err
        return VersionName(version.adapter, version.number)

    return lookup


class SeriesName(NamedTuple):
    group: str  # the chart group: an alias, an adapter, or one of the constants above
    label: str  # the line's name in the legend


def series_name(alias: str, version_id: str, name: VersionName | None) -> SeriesName:
    if not version_id:
        return SeriesName(alias or BASE_LABEL, BASE_LABEL)
    if alias:
        return SeriesName(alias, f"{alias}:v{name.number}" if name else f"{alias}:{version_id}")
    if name is None:
        return SeriesName(UNNAMED_GROUP, version_id)
    return SeriesName(name.adapter, f"{name.adapter}:v{name.number} direct")


class VersionNames:
    """version_id -> adapter and number, learned in the background and kept."""

    def __init__(
        self, lookup: NameLookup | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._known: dict[str, VersionName] = {}
        self._retry_at: dict[str, float] = {}  # version_id -> when to ask again
        self._paused_until = 0.0  # the registry could not be reached
        self._task: asyncio.Task[None] | None = None

    def get(self, version_id: str) -> VersionName | None:
        return self._known.get(version_id)

    def remember(self, version_id: str, name: VersionName) -> None:
        """What an event told (adapter.ready names its version): no need to ask."""
        if version_id and name.adapter:
            self._known[version_id] = name

    def name(self, alias: str, version_id: str) -> SeriesName:
        return series_name(alias, version_id, self._known.get(version_id))

    def learn(self, version_ids: Iterable[str]) -> None:
        """Start naming the versions not known yet (at most one round runs at a time)."""
        if self._lookup is None or (self._task is not None and not self._task.done()):
            return
        now = self._clock()
        if now < self._paused_until:
            return
        # Strangers' ids come and go: only those still waiting are remembered.
        self._retry_at = {v: at for v, at in self._retry_at.items() if at > now}
        wanted = sorted(
            {v for v in version_ids if v and v not in self._known} - self._retry_at.keys()
        )[:LOOKUPS_PER_ROUND]
        if wanted:
            self._task = asyncio.create_task(self._ask(wanted), name="dashboard-names")

    async def _ask(self, version_ids: list[str]) -> None:
        assert self._lookup is not None
        for version_id in version_ids:
            try:
                name = await self._lookup(version_id)
            except ConnectionError as exc:
                self._paused_until = self._clock() + RETRY_UNAVAILABLE_S
                log.warning("dashboard shows version ids: registry unavailable (%s)", exc)
                return
            if name is None:
                self._retry_at[version_id] = self._clock() + RETRY_UNKNOWN_S
            else:
                self._known[version_id] = name
                self._retry_at.pop(version_id, None)

    async def close(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
