"""Hot-load pipeline of one adapter version: registry lookup, base-model check, download,
checksum and tensor checks, atomic move into the cache, backend load, warm-up.

A version already loaded is never touched again (loading it twice is a no-op), and a
failure at any step leaves the versions already served exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from ftops.inference.v1 import inference_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_inference.adapter_check import (
    AdapterLimits,
    check_adapter_config,
    check_file_names,
    check_tensor_values,
    check_tensors,
)
from ftops_inference.backend import Backend, GenerationRequest
from ftops_inference.sampling import SamplingConfig
from ftops_runtime.artifacts import download_artifact
from ftops_runtime.errors import (
    FailedPrecondition,
    FtopsError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

_VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
WARMUP_PROMPT = "Hello"
# The longest pause after one step of a background load.
MAX_PAUSE_S = 0.1


@dataclass
class AdapterRecord:
    version_id: str
    adapter: str = ""
    state: inference_pb2.AdapterState.ValueType = inference_pb2.ADAPTER_STATE_LOADING
    error: str = ""
    load_seconds: float = 0.0

    def to_proto(self) -> inference_pb2.AdapterStatus:
        return inference_pb2.AdapterStatus(
            version_id=self.version_id,
            adapter=self.adapter,
            state=self.state,
            error=self.error,
            load_seconds=self.load_seconds,
        )


@dataclass(frozen=True)
class LoadResult:
    record: AdapterRecord
    # False when the version was already loaded before this call.
    newly_loaded: bool


class AdapterLoader:
    def __init__(
        self,
        *,
        registry: registry_pb2_grpc.RegistryServiceAsyncStub,
        backend: Backend,
        cache_dir: Path,
        base_fingerprint: str,
        registry_timeout_s: float = 10.0,
        duty_cycle: float = 1.0,
        busy: Callable[[], bool] = lambda: False,
        limits: AdapterLimits | None = None,
    ) -> None:
        self._registry = registry
        self._limits = limits or AdapterLimits()
        self._backend = backend
        self._cache_dir = cache_dir
        self.base_fingerprint = base_fingerprint
        self._timeout = registry_timeout_s
        self.records: dict[str, AdapterRecord] = {}
        self._names: dict[str, str] = {}  # "adapter:number" -> version id (immutable)
        self._inflight: dict[str, asyncio.Task[LoadResult]] = {}
        self._duty = duty_cycle
        self._busy = busy
        # Loads a request is waiting for: never paused.
        self._urgent: set[str] = set()
        # Loads run one at a time: the backend serializes them anyway, and it keeps the
        # "already loaded?" check and the load itself atomic.
        self._lock = asyncio.Lock()

    def loaded_id(self, ref: str) -> str | None:
        """The version id if ``ref`` (a version id or "adapter:number") is loaded."""
        version_id = self._names.get(ref, ref)
        record = self.records.get(version_id)
        if record is not None and record.state == inference_pb2.ADAPTER_STATE_LOADED:
            return version_id
        return None

    async def ensure_loaded(self, ref: str, *, background: bool = False) -> LoadResult:
        """Load ``ref`` unless it is loaded; concurrent callers share one load, and a
        caller that goes away does not abort the load for the others. A ``background``
        load (a prefetch nobody waits for) yields to serving; once a request waits for
        the same load, it no longer does."""
        if not ref:
            raise InvalidArgument("version_id is empty")
        loaded = self.loaded_id(ref)
        if loaded is not None:
            return LoadResult(self.records[loaded], newly_loaded=False)
        if not background:
            self._urgent.add(ref)
        task = self._inflight.get(ref)
        if task is None:
            task = asyncio.create_task(self._load(ref), name=f"load-{ref}")
            self._inflight[ref] = task

            def done(_: asyncio.Task[LoadResult]) -> None:
                self._inflight.pop(ref, None)
                self._urgent.discard(ref)

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def unload(self, ref: str) -> AdapterRecord:
        async with self._lock:
            version_id = self.loaded_id(ref)
            if version_id is None:
                raise NotFound(f"adapter version {ref} is not loaded on this replica")
            await self._backend.unload_adapter(version_id)
            record = self.records[version_id]
            record.state = inference_pb2.ADAPTER_STATE_UNLOADED
            with contextlib.suppress(OSError):
                shutil.rmtree(self._cache_dir / version_id)
            log.info("unloaded adapter version %s", version_id)
            return record

    # -- the pipeline ----------------------------------------------------------------

    async def _load(self, ref: str) -> LoadResult:
        async with self._lock:
            looked_up = time.monotonic()
            version = await self._get_version(ref)
            version_id = version.version_id
            self._names[ref] = version_id
            if self.loaded_id(version_id) is not None:
                return LoadResult(self.records[version_id], newly_loaded=False)
            record = AdapterRecord(version_id, version.adapter)
            self.records[version_id] = record
            started = time.monotonic()
            try:
                await self._load_version(ref, version, since=looked_up)
            except FtopsError as exc:
                record.state, record.error = inference_pb2.ADAPTER_STATE_FAILED, str(exc)
                log.warning("refused adapter version %s: %s", version_id, exc)
                raise
            except Exception as exc:
                # What failed, in words a caller can act on: never a path of this server
                # (the message travels in adapter.load_failed and gRPC statuses).
                record.state = inference_pb2.ADAPTER_STATE_FAILED
                record.error = f"loading failed: {public_error(exc, self._cache_dir)}"
                log.warning("loading adapter version %s failed: %s", version_id, record.error)
                log.debug("loading adapter version %s failed", version_id, exc_info=True)
                raise FailedPrecondition(f"version {version_id}: {record.error}") from exc
            record.load_seconds = time.monotonic() - started
            record.state = inference_pb2.ADAPTER_STATE_LOADED
            log.info("loaded adapter version %s in %.2fs", version_id, record.load_seconds)
            return LoadResult(record, newly_loaded=True)

    async def _get_version(self, ref: str) -> registry_pb2.Version:
        request = (
            registry_pb2.GetVersionRequest(name=ref)
            if ":" in ref
            else registry_pb2.GetVersionRequest(version_id=ref)
        )
        try:
            version: registry_pb2.Version = await self._registry.GetVersion(
                request, timeout=self._timeout
            )
            return version
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"adapter version {ref} is not in the registry") from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"bad version reference {ref!r}: {exc.details()}") from exc
            raise Unavailable(f"registry GetVersion({ref}) failed: {exc.details()}") from exc

    async def _pause(self, ref: str, since: float) -> float:
        """After one step of a load that began at ``since``: while requests are being
        served and none waits for this load, pause long enough that loading takes at
        most the duty cycle's share of the time. The replica's interpreter is shared by
        loading and serving (one GIL): a load's ~10 ms of Python in one burst is ~10 ms
        added to every request it overlaps, the same work spread out is a fraction of
        it. Returns when the next step starts."""
        now = time.monotonic()
        if ref not in self._urgent and self._busy():
            pause_s = background_pause_s(now - since, self._duty)
            if pause_s > 0:
                await asyncio.sleep(pause_s)
                now = time.monotonic()
        return now

    async def _load_version(self, ref: str, version: registry_pb2.Version, *, since: float) -> None:
        version_id = version.version_id
        if not _VERSION_ID.match(version_id):
            raise FailedPrecondition(f"registry returned an unusable version id {version_id!r}")
        if version.state == "rejected":
            reasons = "; ".join(version.evaluation.reasons) or "no reason recorded"
            raise FailedPrecondition(
                f"version {version_id} failed its evaluation gate and is never served: {reasons}"
            )
        if version.base_model_fingerprint != self.base_fingerprint:
            raise FailedPrecondition(
                f"version {version_id} was trained on base model {version.base_model!r} "
                f"(fingerprint {version.base_model_fingerprint[:12] or 'none'}), but this "
                f"replica serves fingerprint {self.base_fingerprint[:12]}"
            )
        check_file_names(version_id, [f.path for f in version.files])
        step = await self._pause(ref, since)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version_id}-", dir=self._cache_dir))
        try:
            await self._download(version, tmp)
            step = await self._pause(ref, step)
            # File reads and moves off the event loop: it is serving other versions' tokens.
            final = await asyncio.to_thread(self._check_and_place, version_id, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful move
        try:
            step = await self._pause(ref, step)
            await self._backend.load_adapter(version_id, final)
            step = await self._pause(ref, step)
            await self._backend.generate(
                GenerationRequest(WARMUP_PROMPT, SamplingConfig(max_tokens=1), version_id)
            )
            await self._pause(ref, step)
        except BaseException:
            if self._backend.holds(version_id):
                with contextlib.suppress(Exception):
                    await self._backend.unload_adapter(version_id)
            raise

    def _check_and_place(self, version_id: str, tmp: Path) -> Path:
        check_adapter_config(version_id, tmp, self._limits)
        check_tensors(version_id, tmp, self._backend.module_shapes(), self._limits)
        check_tensor_values(version_id, tmp, self._limits)
        final = self._cache_dir / version_id
        if final.exists():  # left by an earlier process; this one never loaded it
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    async def _download(self, version: registry_pb2.Version, dest: Path) -> None:
        """Stream the artifact into ``dest``; the runtime checks names, sizes and sha256
        against the files the version declares."""
        version_id = version.version_id
        await download_artifact(
            self._registry,
            version.artifact_id,
            dest,
            label=f"version {version_id}",
            expected=list(version.files),
            check_names=lambda names: check_file_names(version_id, names),
            timeout=self._timeout * 30,
        )


def public_error(exc: BaseException, cache_dir: Path) -> str:
    """``exc`` as a message without this server's paths: a file under the adapter cache is
    named by its file name only (``adapter_model.safetensors: No such file or directory``)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{Path(str(exc.filename)).name}: {exc.strerror or type(exc).__name__}"
    text = str(exc) or type(exc).__name__
    for root in {str(cache_dir), str(cache_dir.resolve())}:
        text = re.sub(re.escape(root) + r"[^\s'\",)]*", lambda m: Path(m[0]).name, text)
    return text


def background_pause_s(step_s: float, duty_cycle: float) -> float:
    """The pause after a step of ``step_s`` that makes stepping take ``duty_cycle`` of the
    time, at most MAX_PAUSE_S (a slow step, such as a large download waiting on the
    network, would otherwise hold the load back for long)."""
    if duty_cycle >= 1 or step_s <= 0:
        return 0.0
    return min(step_s * (1 / duty_cycle - 1), MAX_PAUSE_S)
