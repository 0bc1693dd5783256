"""Artifact blobs in a NATS JetStream Object Store bucket: one store shared by every
registry replica on every machine, with no infrastructure beyond the NATS the services
already use.

Same contract as ``LocalArtifactStore``: objects are named by their sha256 (never by a
client's file name); an upload is spooled to a local temporary file while
``UploadSession`` hashes it, and only a verified blob is put into the bucket, whose own
SHA-256 digest is then checked against the name (a mismatch removes the object and
fails). Reads are verified again by the object store and by ``read_verified``.

The store interface is synchronous (callers run it on worker threads), nats-py is
asyncio: the store runs its own connection on a private event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import tempfile
import threading
from collections.abc import Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import nats
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from ftops_registry.artifacts import SHA256_RE, BlobWriter, SpooledBlobWriter
from ftops_runtime.errors import DataLoss

log = logging.getLogger(__name__)
T = TypeVar("T")
DIGEST_PREFIX = "SHA-256="


def _check_name(sha256: str) -> str:
    if not SHA256_RE.match(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return sha256


def digest_matches(digest: str, sha256: str) -> bool:
    """The object store's ``SHA-256=<url-safe base64>`` digest against a hex sha256."""
    if not digest.upper().startswith(DIGEST_PREFIX):
        return False
    raw = base64.urlsafe_b64decode(digest[len(DIGEST_PREFIX) :])
    return raw.hex() == sha256


class NatsObjectArtifactStore:
    def __init__(
        self,
        nats_url: str,
        bucket: str,
        *,
        tmp_dir: Path,
        replicas: int = 1,
        timeout_s: float = 120.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.servers = [s.strip() for s in nats_url.split(",") if s.strip()]
        # Credentials and TLS, as the event bus's (ftops_runtime.tls.nats_connect_options).
        self._connect_options = dict(connect_options or {})
        self.bucket = bucket
        self.tmp_dir = tmp_dir
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = replicas
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="artifact-store-nats", daemon=True
        )
        self._thread.start()
        self._nc: Client | None = None
        self._obs: ObjectStore | None = None
        self._connect_lock = asyncio.Lock()  # used on the store's loop only

    # -- plumbing --------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("the artifact store's own loop cannot wait for itself")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self.timeout_s)

    async def _bucket(self) -> ObjectStore:
        async with self._connect_lock:
            if self._obs is None:
                self._nc = await nats.connect(
                    servers=self.servers, connect_timeout=5, **self._connect_options
                )
                js = self._nc.jetstream()
                try:
                    self._obs = await js.object_store(self.bucket)
                except BucketNotFoundError:
                    # Another replica may create it at the same moment: same config, fine.
                    self._obs = await js.create_object_store(
                        self.bucket,
                        description="ftops artifact blobs by sha256",
                        replicas=self.replicas,
                    )
                    log.info("created the object store bucket %s", self.bucket)
            return self._obs

    def close(self) -> None:
        async def shutdown() -> None:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

        if self._thread.is_alive():
            self._run(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    # -- ArtifactStore -----------------------------------------------------------------

    def new_blob(self) -> BlobWriter:
        return SpooledBlobWriter(self.tmp_dir, self.put_file)

    def put_file(self, sha256: str, path: Path) -> None:
        """Store the verified file as the blob ``sha256``. Putting it again (same bytes)
        refreshes its time, which keeps a racing garbage collection off it."""
        name = _check_name(sha256)

        async def put() -> None:
            obs = await self._bucket()
            with path.open("rb") as fh:
                info = await obs.put(name, fh)
            if not digest_matches(info.digest or "", name):
                await obs.delete(name)
                raise DataLoss(
                    f"the object store computed {info.digest} for blob {name}: "
                    "the bytes changed on the way; nothing was stored"
                )

        self._run(put())

    def exists(self, sha256: str) -> bool:
        name = _check_name(sha256)

        async def check() -> bool:
            try:
                await (await self._bucket()).get_info(name)
            except ObjectNotFoundError:
                return False
            return True

        return self._run(check())

    def open(self, sha256: str) -> BinaryIO:
        """The blob in a temporary file (gone once closed); ``FileNotFoundError`` when
        the bucket has no such object."""
        name = _check_name(sha256)
        fh = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115  # the caller closes it

        async def fetch() -> None:
            try:
                await (await self._bucket()).get(name, writeinto=fh)
            except ObjectNotFoundError:
                raise FileNotFoundError(f"no blob {name} in bucket {self.bucket}") from None

        try:
            self._run(fetch())
        except BaseException:
            fh.close()
            raise
        fh.seek(0)
        return fh

    def delete(self, sha256: str, *, written_before: float) -> int:
        name = _check_name(sha256)

        async def remove() -> int:
            obs = await self._bucket()
            try:
                info = await obs.get_info(name)
            except ObjectNotFoundError:
                return 0
            written = datetime.fromisoformat(info.mtime).timestamp() if info.mtime else 0.0
            if written >= written_before:
                return 0
            await obs.delete(name)
            return int(info.size or 0)

        return self._run(remove())
