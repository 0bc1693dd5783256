"""Retention on a schedule: what keeps the registry's artifact store bounded without an
operator (issue 17's soak).

Every ``retention_interval_s`` the registry archives all but the newest
``retention_keep_last`` versions of every adapter and then garbage-collects the artifacts
nothing needs, under the same rules as ``ArchiveVersions`` and
``GarbageCollectArtifacts`` (retention.py): never a version an alias, a running release or
an unfinished job needs, never an artifact younger than ``artifact_gc_grace_s``. Both are
single transactions whose rules make a repeat harmless, so every registry replica may run
the loop. Each pass is audited like the RPCs (``ArchiveVersions`` per adapter that lost
versions, ``GarbageCollectArtifacts``). Off by default (``retention_keep_last`` 0): archiving
is a release manager's decision unless the installation opts in.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import select

from ftops_registry.db import Database
from ftops_registry.models import AdapterRow
from ftops_registry.retention import Retention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pass:
    archived: int
    collected: int
    freed_bytes: int


class AutoRetention:
    def __init__(
        self, db: Database, retention: Retention, *, keep_last: int, interval_s: float
    ) -> None:
        self._db = db
        self._retention = retention
        self._keep_last = keep_last
        self._interval_s = interval_s

    def once(self) -> Pass:
        """One pass over every adapter (blocking: run it on the database's pool)."""
        with self._db.read() as s:
            adapters = list(s.scalars(select(AdapterRow.name).order_by(AdapterRow.name)))
        archived = 0
        for adapter in adapters:
            got = self._retention.archive_versions(adapter, self._keep_last, dry_run=False)
            archived += len(got.archived_version_ids)
        collected = self._retention.collect_artifacts(dry_run=False)
        return Pass(archived, len(collected.deleted_artifact_ids), collected.freed_bytes)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                done = await self._db.run(self.once)
            except Exception as exc:  # the database down: the next pass tries again
                log.warning("scheduled retention failed: %s", exc)
                continue
            if done.archived or done.collected:
                log.info(
                    "scheduled retention (keep_last=%d): archived %d versions, collected %d "
                    "artifacts, freed %d bytes",
                    self._keep_last,
                    done.archived,
                    done.collected,
                    done.freed_bytes,
                )
