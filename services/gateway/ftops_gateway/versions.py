"""Resolves version references ("ver_..." ids or "adapter:number") through the registry.

Versions are immutable, so a resolved reference is cached for the process lifetime. A
version the trainer's evaluation gate rejected is never served: resolving it fails."""

from __future__ import annotations

import grpc

from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_runtime.errors import FailedPrecondition, NotFound, Unavailable


class VersionResolver:
    def __init__(self, stub: registry_pb2_grpc.RegistryServiceStub, *, timeout_s: float = 5.0):
        self._stub = stub
        self._timeout_s = timeout_s
        self._cache: dict[str, registry_pb2.Version] = {}

    async def resolve(self, ref: str, *, what: str = "version") -> str:
        """The version id ``ref`` names; NotFound (naming ``ref``) if the registry has none."""
        return str((await self.get(ref, what=what)).version_id)

    async def get(self, ref: str, *, what: str = "version") -> registry_pb2.Version:
        """The registry's record of ``ref`` (a servable version: rejected ones fail)."""
        cached = self._cache.get(ref)
        if cached is not None:
            return cached
        request = (
            registry_pb2.GetVersionRequest(name=ref)
            if ":" in ref
            else registry_pb2.GetVersionRequest(version_id=ref)
        )
        try:
            version = await self._stub.GetVersion(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound(f"{what} {ref!r} not found") from exc
            raise Unavailable(f"registry could not resolve {ref!r}: {exc.details()}") from exc
        if version.state == "rejected":
            reasons = "; ".join(version.evaluation.reasons) or "no reason recorded"
            raise FailedPrecondition(
                f"{what} {ref!r} ({version.version_id}) failed its evaluation gate and is never "
                f"served: {reasons}"
            )
        self._cache[ref] = version
        self._cache[version.version_id] = version
        return version  # type: ignore[no-any-return]

    async def base_fingerprint(self, version_id: str) -> str:
        """The fingerprint of the base model ``version_id`` was trained on (replicas that
        serve another base cannot serve it)."""
        return str((await self.get(version_id)).base_model_fingerprint)
