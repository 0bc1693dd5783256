"""What a job may use: its adapter, parent version and artifacts (dataset, the parent's
weights and replay buffer) must belong to the team the job trains for.

The trainer reads the registry with its own key, often a platform admin's, so it checks
on the team's behalf: otherwise a team could train on another team's data or weights, and
then read them back through its own version. Checked at submit, and again when the job
runs. A refusal never tells a caller outside a team what the team has: "belongs to another
team" and "does not exist" read the same (a platform admin, who sees everything, is told
which).
"""

from __future__ import annotations

import grpc

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime import auth
from ftops_runtime.errors import FailedPrecondition, NotFound, PermissionDenied
from ftops_trainer.store import REGISTRY_TIMEOUT_S

# The registry's answers that mean "not this team's", whatever the reason.
HIDDEN = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED})


def _sees_everything() -> bool:
    """A platform admin (or anyone with auth off) may be told that something is missing."""
    return auth.current().platform_admin


def not_the_teams(what: str, team: str, *, missing: bool = False) -> PermissionDenied | NotFound:
    """The refusal for ``what`` (e.g. "parent version 'ver_x'") that ``team`` may not use."""
    if missing and _sees_everything():
        return NotFound(f"{what} does not exist")
    owner = f"team {team!r}" if team else "a job without a team"
    return PermissionDenied(f"{what} does not exist or is not usable by {owner}")


async def adapter_team(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, adapter: str
) -> str | None:
    """The team that owns ``adapter`` ("" for one made before teams), None when it does not
    exist yet; an adapter the trainer's key may not read counts as another team's."""
    try:
        listed: registry_pb2.ListVersionsResponse = await registry.ListVersions(
            registry_pb2.ListVersionsRequest(adapter=adapter, page_size=1),
            timeout=REGISTRY_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            raise _taken(adapter) from exc
        raise
    return listed.versions[0].team if listed.versions else None


def _taken(adapter: str) -> PermissionDenied:
    # Adapter names are global: say it is taken, never by whom.
    return PermissionDenied(
        f"adapter {adapter!r} belongs to another team: train it under another name"
    )


async def job_team(
    registry: registry_pb2_grpc.RegistryServiceAsyncStub, adapter: str, team: str
) -> str:
    """The team a job for ``adapter`` trains for: ``team``, which must own the adapter when
    it exists; without one (platform admins only), the adapter's own."""
    owner = await adapter_team(registry, adapter)
    if owner is None:
        return team
    if team and owner != team:
        raise _taken(adapter)
    return owner


def check_parent(version: registry_pb2.Version, *, ref: str, team: str, adapter: str) -> None:
    """A parent is a version of the job's own adapter (lineage never crosses adapters, so
    never teams): another team's is refused like a missing one, before any training."""
    if version.team != team:
        raise not_the_teams(f"parent version {ref!r}", team)
    if version.adapter != adapter:
        raise FailedPrecondition(
            f"parent version {ref!r} is a version of adapter {version.adapter!r}, not "
            f"{adapter!r}: a version continues its own adapter's lineage"
        )
