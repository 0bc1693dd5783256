"""Access control of the registry over real gRPC: teams alpha and beta, a key per role in
each, and for every mutating RPC and role the allowed and the denied case; reads across
teams; keys shown once, stored hashed, revoked and expired; the audit of refusals;
migration 0004 from 0003 (SQLite and the real Postgres)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import MetaData, select, text, update

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_registry.app import RegistryApp
from ftops_registry.models import ApiKeyRow
from ftops_registry.settings import RegistrySettings
from ftops_runtime import auth
from ftops_runtime.auth import Role
from ftops_runtime.client import channel
from ftops_runtime.errors import Unauthenticated

pytestmark = pytest.mark.integration
if TYPE_CHECKING:  # the async stub exists only in the .pyi
    Stub = registry_pb2_grpc.RegistryServiceAsyncStub
    # Each case performs one mutating RPC against `team`'s resources with `stub`.
    Case = Callable[["World", Stub, str], Awaitable[object]]
FP = hashlib.sha256(b"tiny base model").hexdigest()
TEAMS = ("alpha", "beta")
ROLES = tuple(Role)
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _stub(ch: grpc.aio.Channel) -> Stub:
    return cast("Stub", registry_pb2_grpc.RegistryServiceStub(ch))


def _files(blobs: dict[str, bytes]) -> list[common_pb2.ArtifactFile]:
    return [
        common_pb2.ArtifactFile(path=p, sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d))
        for p, d in blobs.items()
    ]


async def _upload(stub: Stub, data: bytes, team: str = "") -> registry_pb2.Artifact:
    blobs = {"adapter_model.safetensors": data}

    async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(
            header=registry_pb2.UploadHeader(files=_files(blobs), team=team)
        )
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=0, data=data)
        )

    artifact: registry_pb2.Artifact = await stub.UploadArtifact(requests())
    return artifact


def _role_pb(team: str, role: Role) -> registry_pb2.TeamRole:
    return registry_pb2.TeamRole(team=team, role=auth.role_to_proto(role))


@dataclass
class World:
    app: RegistryApp
    admin_key: str
    admin: Stub
    keys: dict[tuple[str, Role], str] = field(default_factory=dict)
    stubs: dict[tuple[str, Role], Stub] = field(default_factory=dict)
    versions: dict[str, registry_pb2.Version] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def open(self, key: str) -> Stub:
        ch = channel(self.app.address, api_key=key)
        self.channels.append(ch)
        return _stub(ch)

    async def new_key(self, team: str, role: Role) -> registry_pb2.CreateApiKeyResponse:
        created: registry_pb2.CreateApiKeyResponse = await self.admin.CreateApiKey(
            registry_pb2.CreateApiKeyRequest(name=f"{team}-{role}", roles=[_role_pb(team, role)])
        )
        return created


def _settings(tmp_path: Path, nats_url: str, database_url: str, admin_key: str) -> RegistrySettings:
    return RegistrySettings(
        grpc_port=0,
        nats_url=nats_url,
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        health_interval_s=0.1,
        shutdown_grace_s=1,
        instance_id=f"auth-{uuid.uuid4().hex[:6]}",
        auth_mode="enabled",
        bootstrap_admin_key=admin_key,
    )


async def _world(tmp_path: Path, nats_url: str, database_url: str) -> World:
    admin_key = auth.new_api_key()[1]
    app = RegistryApp(
        _settings(tmp_path, nats_url, database_url, admin_key),
        durable=f"registry-auth-{uuid.uuid4().hex[:8]}",
    )
    await app.start()
    await app.wait_ready()
    ch = channel(app.address, api_key=admin_key)
    world = World(app, admin_key, _stub(ch), channels=[ch])
    try:
        await _populate(world)
    except BaseException:
        await _close(world)
        raise
    return world


async def _populate(world: World) -> None:
    await world.admin.RegisterBaseModel(
        registry_pb2.RegisterBaseModelRequest(name="tiny", fingerprint=FP, uri="/models/tiny")
    )
    for team in TEAMS:
        await world.admin.CreateTeam(registry_pb2.CreateTeamRequest(name=team))
        for role in ROLES:
            created = await world.new_key(team, role)
            world.keys[team, role] = created.secret
            world.stubs[team, role] = world.open(created.secret)
        trainer = world.stubs[team, Role.trainer]
        artifact = await _upload(trainer, f"{team} weights".encode())
        world.artifacts[team] = artifact.artifact_id
        world.versions[team] = await trainer.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter=f"{team}-bot",
                team=team,
                base_model="tiny",
                artifact_id=artifact.artifact_id,
            )
        )


async def _close(world: World) -> None:
    for ch in world.channels:
        await ch.close()
    await world.app.stop()


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("registry-auth")
    w = await _world(tmp, nats_url, f"sqlite:///{tmp}/registry.db")
    yield w
    await _close(w)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the matrix ---------------------------------------------------------------------------


async def upload_artifact(w: World, stub: Stub, team: str) -> object:
    return await _upload(stub, _unique("blob").encode(), team=team)


async def register_version(w: World, stub: Stub, team: str) -> object:
    return await stub.RegisterVersion(
        registry_pb2.RegisterVersionRequest(adapter=f"{team}-bot", artifact_id=w.artifacts[team])
    )


async def set_alias(w: World, stub: Stub, team: str) -> object:
    return await stub.SetAlias(
        registry_pb2.SetAliasRequest(
            adapter=f"{team}-bot", name=_unique("alias"), version_id=w.versions[team].version_id
        )
    )


async def put_job(w: World, stub: Stub, team: str) -> object:
    job = trainer_pb2.Job(
        job_id=_unique("job"),
        state=events_pb2.JOB_STATE_QUEUED,
        spec=trainer_pb2.JobSpec(adapter=f"{team}-bot", team=team),
    )
    return await stub.PutJob(registry_pb2.PutJobRequest(job=job))


async def archive_versions(w: World, stub: Stub, team: str) -> object:
    return await stub.ArchiveVersions(
        registry_pb2.ArchiveVersionsRequest(adapter=f"{team}-bot", keep_last=1000)
    )


async def create_api_key(w: World, stub: Stub, team: str) -> object:
    return await stub.CreateApiKey(
        registry_pb2.CreateApiKeyRequest(name="new", roles=[_role_pb(team, Role.viewer)])
    )


async def revoke_api_key(w: World, stub: Stub, team: str) -> object:
    victim = await w.new_key(team, Role.viewer)
    return await stub.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=victim.key.key_id))


TEAM_CASES: dict[str, tuple[Case, set[Role]]] = {  # rpc: (case, roles allowed in own team)
    "UploadArtifact": (upload_artifact, {Role.trainer, Role.admin}),
    "RegisterVersion": (register_version, {Role.trainer, Role.admin}),
    "SetAlias": (set_alias, {Role.releaser, Role.admin}),
    "PutJob": (put_job, {Role.trainer, Role.admin}),
    "ArchiveVersions": (archive_versions, {Role.releaser, Role.admin}),
    "CreateApiKey": (create_api_key, {Role.admin}),
    "RevokeApiKey": (revoke_api_key, {Role.admin}),
}


async def _denied(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == DENIED, info.value.details()
    return info.value


async def _check_case(w: World, rpc: str, role: Role) -> None:
    case, allowed = TEAM_CASES[rpc]
    stub = w.stubs["alpha", role]
    if role in allowed:
        await case(w, stub, "alpha")  # own team: allowed
    else:
        error = await _denied(case(w, stub, "alpha"))  # own team, wrong role
        assert "'alpha'" in (error.details() or "")
    await _denied(case(w, stub, "beta"))  # another team: never, whatever the role


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("rpc", sorted(TEAM_CASES))
async def test_team_rpc_matrix(world: World, rpc: str, role: Role) -> None:
    await _check_case(world, rpc, role)
    # The platform admin may do it in any team.
    await TEAM_CASES[rpc][0](world, world.admin, "beta")


@pytest.mark.parametrize("role", ROLES, ids=str)
async def test_base_models_are_added_by_admins_only(world: World, role: Role) -> None:
    request = registry_pb2.RegisterBaseModelRequest(name=_unique("base"), fingerprint=FP, uri="/m")
    if role is Role.admin:
        await world.stubs["alpha", role].RegisterBaseModel(request)
    else:
        await _denied(world.stubs["alpha", role].RegisterBaseModel(request))
    # Shared read-only by every team.
    base = await world.stubs["beta", role].GetBaseModel(
        registry_pb2.GetBaseModelRequest(name="tiny")
    )
    assert base.fingerprint == FP


async def test_a_base_model_other_teams_use_is_moved_by_platform_admins_only(
    world: World,
) -> None:
    # Issue 14: beta's admin re-registered the base model alpha trains on (same
    # fingerprint, another uri) and alpha's next job failed.
    def move(name: str, uri: str) -> registry_pb2.RegisterBaseModelRequest:
        return registry_pb2.RegisterBaseModelRequest(name=name, fingerprint=FP, uri=uri)

    since = Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    for team in TEAMS:  # "tiny": alpha-bot and beta-bot train on it
        error = await _denied(world.stubs[team, Role.admin].RegisterBaseModel(move("tiny", "/x")))
        assert "platform" in (error.details() or "")
        assert "alpha" not in (error.details() or "")
        assert "beta" not in (error.details() or "")
    tiny = await world.admin.GetBaseModel(registry_pb2.GetBaseModelRequest(name="tiny"))
    assert tiny.uri == "/models/tiny"
    # Registering it again unchanged (as an inference replica does at start) changes nothing.
    await world.stubs["alpha", Role.admin].RegisterBaseModel(move("tiny", "/models/tiny"))
    audit = await world.admin.ListAudit(
        registry_pb2.ListAuditRequest(resource_prefix="base_model:tiny", since=since)
    )
    assert [e.outcome for e in audit.entries].count("PERMISSION_DENIED") == len(TEAMS)

    # One only alpha's adapters use: alpha's admin may move it, beta's may not.
    own = _unique("alpha-base")
    await world.stubs["alpha", Role.admin].RegisterBaseModel(move(own, "/a"))
    artifact = await _upload(world.stubs["alpha", Role.trainer], _unique("w").encode())
    await world.stubs["alpha", Role.trainer].RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter=_unique("alpha-own"),
            team="alpha",
            base_model=own,
            artifact_id=artifact.artifact_id,
        )
    )
    await world.stubs["alpha", Role.admin].RegisterBaseModel(move(own, "/b"))
    await _denied(world.stubs["beta", Role.admin].RegisterBaseModel(move(own, "/c")))
    # The platform admin moves shared ones.
    await world.admin.RegisterBaseModel(move("tiny", "/elsewhere/tiny"))
    await world.admin.RegisterBaseModel(move("tiny", "/models/tiny"))


async def test_a_version_uses_only_artifacts_its_team_may_use_whoever_registers_it(
    world: World,
) -> None:
    """Issue 14: a service acting for beta with a platform-admin key (the trainer) put
    alpha's dataset in a beta version, and beta's viewer could download it from then on.
    The team's access is checked whoever calls; a download may name the team it is for."""
    secret = _unique("alpha dataset").encode()
    dataset = (await _upload(world.stubs["alpha", Role.trainer], secret)).artifact_id
    error = await _denied(
        world.admin.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter="beta-bot",
                artifact_id=world.artifacts["beta"],
                dataset_artifact_id=dataset,
            )
        )
    )
    assert "'beta'" in (error.details() or "")
    beta_viewer = world.stubs["beta", Role.viewer]
    request = registry_pb2.DownloadArtifactRequest(artifact_id=dataset)
    await _denied(_drain(beta_viewer.DownloadArtifact(request)))

    # Downloads on behalf of a team: the team must be allowed, even for a platform admin.
    for_beta = registry_pb2.DownloadArtifactRequest(artifact_id=dataset, team="beta")
    await _denied(_drain(world.admin.DownloadArtifact(for_beta)))
    for_alpha = registry_pb2.DownloadArtifactRequest(artifact_id=dataset, team="alpha")
    assert await _drain(world.admin.DownloadArtifact(for_alpha)) == len(secret)
    assert await _drain(world.stubs["alpha", Role.viewer].DownloadArtifact(for_alpha))
    await _denied(_drain(beta_viewer.DownloadArtifact(for_alpha)))  # not beta's to ask
    # Without a team a platform admin still reads everything.
    assert await _drain(world.admin.DownloadArtifact(request)) == len(secret)

    # A platform admin's own upload (of no team) is its to give to a team's version; a
    # download on the team's behalf counts only what the team may use.
    own = (await _upload(world.admin, _unique("platform data").encode())).artifact_id
    own_for_beta = registry_pb2.DownloadArtifactRequest(artifact_id=own, team="beta")
    await _denied(_drain(world.admin.DownloadArtifact(own_for_beta)))
    await world.admin.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter="beta-bot", artifact_id=world.artifacts["beta"], dataset_artifact_id=own
        )
    )
    assert await _drain(world.admin.DownloadArtifact(own_for_beta))


@pytest.mark.parametrize("role", ROLES, ids=str)
async def test_platform_wide_rpcs_need_a_platform_admin(world: World, role: Role) -> None:
    stub = world.stubs["alpha", role]
    await _denied(stub.CreateTeam(registry_pb2.CreateTeamRequest(name=_unique("team"))))
    await _denied(
        stub.GarbageCollectArtifacts(registry_pb2.GarbageCollectArtifactsRequest(dry_run=True))
    )
    await _denied(
        stub.CreateApiKey(registry_pb2.CreateApiKeyRequest(name="root", platform_admin=True))
    )
    await world.admin.CreateTeam(registry_pb2.CreateTeamRequest(name=_unique("team")))
    await world.admin.GarbageCollectArtifacts(
        registry_pb2.GarbageCollectArtifactsRequest(dry_run=True)
    )


# -- reads across teams ---------------------------------------------------------------


async def test_a_team_cannot_see_another_teams_adapter_by_any_path(world: World) -> None:
    alpha = world.versions["alpha"]
    await world.stubs["alpha", Role.releaser].SetAlias(
        registry_pb2.SetAliasRequest(
            adapter="alpha-bot", name="stable", version_id=alpha.version_id
        )
    )
    release_id = _unique("rel")
    # History is recorded from the gateway's route.changed for the release it started.
    started = events_pb2.RouteChanged(
        meta=common_pb2.EventMeta(event_id=_unique("evt")),
        alias="alpha-bot",
        revision=1,
        stable_version_id=alpha.version_id,
        release=events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state="running",
            stable_version_id=alpha.version_id,
            candidate_version_id=alpha.version_id,
            change=events_pb2.ReleaseChange(kind="started", event_id=_unique("evt")),
        ),
    )
    assert await world.app.db.run(world.app.releases.apply_route_changed, started)

    viewer = world.stubs["alpha", Role.viewer]
    outsider = world.stubs["beta", Role.admin]  # admin of beta is nobody in alpha
    reads: list[Callable[[Stub], Awaitable[object]]] = [
        lambda s: s.GetVersion(registry_pb2.GetVersionRequest(version_id=alpha.version_id)),
        lambda s: s.GetVersion(registry_pb2.GetVersionRequest(name="alpha-bot:1")),
        lambda s: s.ListVersions(registry_pb2.ListVersionsRequest(adapter="alpha-bot")),
        lambda s: s.GetLineage(registry_pb2.GetLineageRequest(version_id=alpha.version_id)),
        lambda s: s.GetAlias(registry_pb2.GetAliasRequest(adapter="alpha-bot", name="stable")),
        lambda s: s.GetRelease(registry_pb2.GetReleaseRequest(release_id=release_id)),
        lambda s: s.GetJob(registry_pb2.GetJobRecordRequest(job_id=job_id)),
        lambda s: _drain(
            s.DownloadArtifact(
                registry_pb2.DownloadArtifactRequest(artifact_id=world.artifacts["alpha"])
            )
        ),
    ]
    job_id = _unique("job")
    await world.stubs["alpha", Role.trainer].PutJob(
        registry_pb2.PutJobRequest(
            job=trainer_pb2.Job(
                job_id=job_id,
                state=events_pb2.JOB_STATE_QUEUED,
                spec=trainer_pb2.JobSpec(adapter="alpha-bot", team="alpha"),
            )
        )
    )
    for read in reads:
        await read(viewer)
        await _denied(read(outsider))

    # Listings show only the caller's teams.
    def ids(releases: registry_pb2.ListReleasesResponse) -> set[str]:
        return {r.release_id for r in releases.releases}

    assert release_id in ids(await viewer.ListReleases(registry_pb2.ListReleasesRequest()))
    assert release_id not in ids(await outsider.ListReleases(registry_pb2.ListReleasesRequest()))
    jobs = await outsider.ListJobs(registry_pb2.ListJobRecordsRequest())
    assert jobs.jobs
    assert {j.job.spec.team for j in jobs.jobs} == {"beta"}
    await _denied(outsider.ListJobs(registry_pb2.ListJobRecordsRequest(team="alpha")))
    teams = await outsider.ListTeams(registry_pb2.ListTeamsRequest())
    assert [t.name for t in teams.teams] == ["beta"]
    assert {"alpha", "beta"} <= {
        t.name for t in (await world.admin.ListTeams(registry_pb2.ListTeamsRequest())).teams
    }


async def _drain(stream: AsyncIterator[registry_pb2.DownloadArtifactResponse]) -> int:
    return sum([len(part.chunk.data) async for part in stream])


async def test_another_teams_artifact_id_is_no_key_to_it(world: World) -> None:
    """Content addressing shares blobs, not access: an artifact id seen elsewhere cannot
    be registered under one's own adapter (and so downloaded) without uploading it."""
    trainer = world.stubs["beta", Role.trainer]
    beta = world.versions["beta"]
    error = await _denied(
        trainer.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter="beta-bot", artifact_id=world.artifacts["alpha"]
            )
        )
    )
    assert "not uploaded for team 'beta'" in (error.details() or "")
    # Uploading the same bytes proves possession: then it may.
    await _upload(trainer, b"alpha weights")
    v = await trainer.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter="beta-bot",
            artifact_id=world.artifacts["alpha"],
            parent_version_id=beta.version_id,
        )
    )
    assert v.team == "beta"
    # A parent from another team's adapter is refused by the lineage rules.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.admin.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter="beta-bot",
                artifact_id=world.artifacts["beta"],
                parent_version_id=world.versions["alpha"].version_id,
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_trainer_cannot_take_over_another_teams_adapter_name(world: World) -> None:
    await _denied(
        world.stubs["beta", Role.trainer].RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter="alpha-bot", team="beta", artifact_id=world.artifacts["beta"]
            )
        )
    )
    await _denied(  # nor create an adapter for a team it is not in
        world.stubs["beta", Role.trainer].RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter=_unique("new"),
                team="alpha",
                base_model="tiny",
                artifact_id=world.artifacts["beta"],
            )
        )
    )


async def test_refusals_are_audited_and_the_audit_is_per_team(world: World) -> None:
    outsider = world.stubs["beta", Role.viewer]
    outsider_id = auth.parse_api_key(world.keys["beta", Role.viewer])
    assert outsider_id is not None
    since = Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    await _denied(
        outsider.SetAlias(
            registry_pb2.SetAliasRequest(
                adapter="alpha-bot", name="stable", version_id=world.versions["alpha"].version_id
            )
        )
    )
    await _denied(
        outsider.GetVersion(
            registry_pb2.GetVersionRequest(version_id=world.versions["alpha"].version_id)
        )
    )
    audit = await world.stubs["alpha", Role.viewer].ListAudit(
        registry_pb2.ListAuditRequest(team="alpha", since=since)
    )
    refused = [
        (e.method, e.resource)
        for e in audit.entries
        if e.actor == outsider_id.key_id and e.outcome == "PERMISSION_DENIED"
    ]
    assert ("SetAlias", "alias:alpha-bot/stable") in refused
    assert ("GetVersion", f"version:{world.versions['alpha'].version_id}") in refused
    # Beta sees only beta's entries; alpha's audit is not theirs to read.
    mine = await outsider.ListAudit(registry_pb2.ListAuditRequest(page_size=500))
    assert mine.entries
    assert {e.team for e in mine.entries} == {"beta"}
    await _denied(outsider.ListAudit(registry_pb2.ListAuditRequest(team="alpha")))


# -- keys -------------------------------------------------------------------------------


async def _unauthenticated(call: Awaitable[object]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    return info.value.details() or ""


async def test_missing_malformed_and_unknown_keys_are_unauthenticated(world: World) -> None:
    request = registry_pb2.GetBaseModelRequest(name="tiny")
    async with channel(world.app.address) as ch:
        assert "missing API key" in await _unauthenticated(_stub(ch).GetBaseModel(request))
        # Authenticate is public, but still refuses a bad key.
        assert "not an ftops API key" in await _unauthenticated(
            _stub(ch).Authenticate(registry_pb2.AuthenticateRequest(api_key="nope"))
        )
    known = auth.parse_api_key(world.keys["alpha", Role.viewer])
    assert known is not None
    wrong_secret = f"ftk_{known.key_id}_{'x' * 43}"
    for key, says in (
        ("not-a-key", "not an ftops API key"),
        (auth.new_api_key()[1], "unknown API key"),
        (wrong_secret, "unknown API key"),  # never "revoked"/"expired" without the secret
    ):
        async with channel(world.app.address, api_key=key) as ch:
            assert says in await _unauthenticated(_stub(ch).GetBaseModel(request))


async def test_unauthenticated_calls_are_audited_under_the_key_presented(world: World) -> None:
    # Refusals are flushed to the audit log once a second: let the earlier tests' land
    # before this test's window opens, so only this test's calls are counted.
    await asyncio.sleep(1.2)
    since = Timestamp()
    since.FromDatetime(datetime.now(UTC))
    request = registry_pb2.GetBaseModelRequest(name="tiny")
    created = await world.new_key("alpha", Role.viewer)
    await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
    unknown_id, unknown = auth.new_api_key()
    for key in ("", unknown, unknown, created.secret):
        async with channel(world.app.address, api_key=key) as ch:
            await _unauthenticated(_stub(ch).GetBaseModel(request))
    async with channel(world.app.address) as ch:
        await _unauthenticated(
            _stub(ch).Authenticate(registry_pb2.AuthenticateRequest(api_key=unknown))
        )
    wanted = {
        ("anonymous", "GetBaseModel"): 1,
        (unknown_id, "GetBaseModel"): 2,  # aggregated: one entry, counted twice
        (created.key.key_id, "GetBaseModel"): 1,
        (unknown_id, "Authenticate"): 1,
    }
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        listed = await world.admin.ListAudit(
            registry_pb2.ListAuditRequest(resource_prefix="service:registry", since=since)
        )
        counts: dict[tuple[str, str], int] = {}
        details: dict[tuple[str, str], str] = {}
        for e in listed.entries:
            if e.outcome == "UNAUTHENTICATED" and (e.actor, e.method) in wanted:
                match = re.search(r"\((\d+) times from", e.detail)
                counts[e.actor, e.method] = counts.get((e.actor, e.method), 0) + (
                    int(match.group(1)) if match else 1
                )
                details[e.actor, e.method] = e.detail
        if counts == wanted or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert counts == wanted
    assert "127.0.0.1" in details[unknown_id, "GetBaseModel"]
    assert "revoked" in details[created.key.key_id, "GetBaseModel"]
    assert unknown.rsplit("_", 1)[1] not in listed.SerializeToString().decode(errors="ignore")


async def test_a_key_is_shown_once_hashed_at_rest_and_revocable(world: World) -> None:
    admin = world.stubs["alpha", Role.admin]
    created = await admin.CreateApiKey(
        registry_pb2.CreateApiKeyRequest(name="ci", roles=[_role_pb("alpha", Role.trainer)])
    )
    parsed = auth.parse_api_key(created.secret)
    assert parsed is not None
    assert parsed.key_id == created.key.key_id
    listed = await admin.ListApiKeys(registry_pb2.ListApiKeysRequest(team="alpha"))
    assert created.key.key_id in {k.key_id for k in listed.keys}
    assert parsed.secret.encode() not in listed.SerializeToString()
    assert not await _secret_in_database(world, parsed.secret)

    principal = await world.admin.Authenticate(
        registry_pb2.AuthenticateRequest(api_key=created.secret)
    )
    assert [(r.team, auth.role_from_proto(r.role)) for r in principal.roles] == [
        ("alpha", Role.trainer)
    ]
    ci = world.open(created.secret)
    await ci.ListVersions(registry_pb2.ListVersionsRequest(adapter="alpha-bot"))

    # Beta's admin cannot revoke alpha's key; alpha's admin can.
    await _denied(
        world.stubs["beta", Role.admin].RevokeApiKey(
            registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id)
        )
    )
    revoked = await admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
    assert revoked.HasField("revoked_at")
    assert "revoked" in await _unauthenticated(
        ci.ListVersions(registry_pb2.ListVersionsRequest(adapter="alpha-bot"))
    )
    listed = await admin.ListApiKeys(registry_pb2.ListApiKeysRequest(team="alpha"))
    assert created.key.key_id not in {k.key_id for k in listed.keys}
    with_revoked = await admin.ListApiKeys(
        registry_pb2.ListApiKeysRequest(team="alpha", include_revoked=True)
    )
    assert created.key.key_id in {k.key_id for k in with_revoked.keys}


async def _secret_in_database(world: World, secret: str) -> bool:
    def scan() -> bool:
        meta = MetaData()
        meta.reflect(world.app.db.engine)
        with world.app.db.engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(select(table)):
                    if any(secret in str(value) for value in row):
                        return True
        return False

    found = await world.app.db.run(scan)
    url = world.app.db.url
    if url.get_backend_name() == "sqlite" and url.database:
        for path in Path(url.database).parent.glob(Path(url.database).name + "*"):
            found = found or secret.encode() in path.read_bytes()
    return found


async def test_an_expired_key_is_unauthenticated(world: World) -> None:
    created = await world.admin.CreateApiKey(
        registry_pb2.CreateApiKeyRequest(
            name="temp",
            roles=[_role_pb("alpha", Role.viewer)],
            expires_at=_ts(datetime.now(UTC) + timedelta(hours=1)),
        )
    )
    temp = world.open(created.secret)
    await temp.GetBaseModel(registry_pb2.GetBaseModelRequest(name="tiny"))

    def expire() -> None:
        with world.app.db.engine.begin() as conn:
            conn.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.key_id == created.key.key_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )

    await world.app.db.run(expire)
    assert "expired" in await _unauthenticated(
        temp.GetBaseModel(registry_pb2.GetBaseModelRequest(name="tiny"))
    )
    # An expiry in the past is refused at creation.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.admin.CreateApiKey(
            registry_pb2.CreateApiKeyRequest(
                name="late",
                roles=[_role_pb("alpha", Role.viewer)],
                expires_at=_ts(datetime.now(UTC) - timedelta(hours=1)),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _ts(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (registry_pb2.CreateApiKeyRequest(name="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            registry_pb2.CreateApiKeyRequest(name="x", roles=[registry_pb2.TeamRole(team="alpha")]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            registry_pb2.CreateApiKeyRequest(name="", roles=[_role_pb("alpha", Role.viewer)]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            registry_pb2.CreateApiKeyRequest(name="x", roles=[_role_pb("nosuchteam", Role.viewer)]),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
async def test_bad_key_requests_get_clear_errors(
    world: World, request_: registry_pb2.CreateApiKeyRequest, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.admin.CreateApiKey(request_)
    assert info.value.code() == code


async def test_bad_team_and_revoke_requests(world: World) -> None:
    for name, code in (
        ("../etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("a\x00b", grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 300, grpc.StatusCode.INVALID_ARGUMENT),
        ("alpha", grpc.StatusCode.ALREADY_EXISTS),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await world.admin.CreateTeam(registry_pb2.CreateTeamRequest(name=name))
        assert info.value.code() == code
    for key_id, code in (
        ("../x", grpc.StatusCode.INVALID_ARGUMENT),
        ("0" * 16, grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=key_id))
        assert info.value.code() == code


async def test_a_key_may_revoke_itself(world: World) -> None:
    created = await world.new_key("beta", Role.viewer)
    own = world.open(created.secret)
    await own.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
    await _unauthenticated(own.GetBaseModel(registry_pb2.GetBaseModelRequest(name="tiny")))


async def test_other_services_resolve_keys_through_authenticate(world: World) -> None:
    """The resolver the other services use, against this registry: roles arrive, and a
    revocation shows once the cache's TTL has passed (0 here: at once)."""
    created = await world.new_key("alpha", Role.releaser)
    remote = auth.RegistryResolver(world.app.address)
    try:
        authenticate = auth.authenticator(auth.CachedResolver(remote, ttl_s=0))
        md = {"authorization": f"Bearer {created.secret}"}
        principal = await authenticate(md, "/ftops.gateway.v1.GatewayService/StartRelease")
        assert isinstance(principal, auth.AuthPrincipal)
        assert principal.can("alpha", Role.releaser)
        assert not principal.can("beta", Role.viewer)
        await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
        with pytest.raises(Unauthenticated, match="revoked"):
            await authenticate(md, "/ftops.gateway.v1.GatewayService/StartRelease")
    finally:
        await remote.close()


async def test_resolver_reports_an_unreachable_registry_as_unavailable() -> None:
    from ftops_runtime.errors import Unavailable

    remote = auth.RegistryResolver("127.0.0.1:1", timeout_s=0.5)
    try:
        with pytest.raises(Unavailable, match="cannot verify"):
            await remote(auth.new_api_key()[1], "/x/Y")
    finally:
        await remote.close()


# -- both databases -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/registry.db"
    else:
        yield request.getfixturevalue("postgres_url")


async def test_matrix_subset_and_parallel_registrations(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    w = await _world(tmp_path, nats_url, database_url)
    try:
        for rpc in ("RegisterVersion", "SetAlias", "CreateApiKey"):
            for role in ROLES:
                await _check_case(w, rpc, role)
        assert not await _secret_in_database(w, w.admin_key.split("_", 2)[2])

        # 20 parallel registrations by a trainer key: 20 distinct consecutive numbers.
        trainer = w.stubs["beta", Role.trainer]
        versions = await asyncio.gather(*(register_version(w, trainer, "beta") for _ in range(20)))
        numbers = sorted(cast(registry_pb2.Version, v).number for v in versions)
        assert numbers == list(range(2, 22))
    finally:
        await _close(w)


async def test_0003_database_upgrades_with_teams_and_artifact_access(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import DateTime, bindparam

    from ftops_registry.db import MIGRATIONS_DIR, Database
    from ftops_registry.keys import Keys
    from ftops_registry.models import ArtifactTeamRow, TeamRow

    db = Database(database_url)
    try:

        def alembic(conn: object) -> Config:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            return config

        with db.engine.connect() as conn:
            command.upgrade(alembic(conn), "0003")
            conn.commit()
        dataset = "d" * 64
        job = trainer_pb2.Job(
            job_id="j1", spec=trainer_pb2.JobSpec(team="ml", dataset_artifact_id=dataset)
        )
        rows = [
            "INSERT INTO base_models VALUES ('tiny', :fp, '/m', :t)",
            "INSERT INTO adapters VALUES ('old-bot', 'ops', 'tiny', 1, :t)",
            "INSERT INTO adapters VALUES ('loose-bot', '', 'tiny', 0, :t)",
            "INSERT INTO artifacts (artifact_id, total_bytes, created_at) VALUES (:fp, 1, :t)",
            "INSERT INTO artifacts (artifact_id, total_bytes, created_at) VALUES (:ds, 1, :t)",
            "INSERT INTO versions (version_id, adapter, number, artifact_id, "
            "base_model_fingerprint, job_id, dataset_fingerprint, method, metrics, labels, "
            "archived, created_at, state) VALUES ('ver_0123456789', 'old-bot', 1, :fp, :fp, "
            "'', '', 'lora', '{}', '{}', FALSE, :t, 'ready')",
            "INSERT INTO jobs VALUES ('j1', 'old-bot', 'ml', 1, :t, :t, 1, :job)",
        ]
        with db.engine.begin() as conn:
            for sql in rows:
                stmt = text(sql).bindparams(bindparam("t", type_=DateTime(timezone=True)))
                conn.execute(
                    stmt,
                    {
                        "fp": FP,
                        "ds": dataset,
                        "t": datetime.now(UTC),
                        "job": job.SerializeToString(),
                    },
                )
        db.migrate()
        with db.read() as s:
            assert sorted(s.scalars(select(TeamRow.name))) == ["ml", "ops"]
            grants = set(s.execute(select(ArtifactTeamRow.artifact_id, ArtifactTeamRow.team)))
            assert grants == {(FP, "ops"), (dataset, "ml")}
        # The upgraded database takes keys right away.
        key, created = Keys(db).bootstrap_admin()
        assert created
        assert Keys(db).resolve(key).platform_admin
        # And goes back down to 0003 and up again.
        with db.engine.connect() as conn:
            command.downgrade(alembic(conn), "0003")
            command.upgrade(alembic(conn), "head")
            conn.commit()
    finally:
        db.close()
