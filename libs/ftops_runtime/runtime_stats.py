"""``ftops.common.v1.RuntimeService``: a process's resident memory, open file descriptors,
threads and asyncio tasks, served by every service's gRPC skeleton. What a soak run
(bench/soak.py) samples to tell a leak from a plateau; cheap enough to call every second
(a read of /proc/self/status and /proc/self/fd, a count of the loop's tasks)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from ftops.common.v1 import runtime_pb2, runtime_pb2_grpc
from ftops_runtime.auth import AuthPrincipal
from ftops_runtime.errors import PermissionDenied
from ftops_runtime.interceptors import current_principal

SERVICE_NAME = "ftops.common.v1.RuntimeService"


def _status_fields(*names: str) -> dict[str, int]:
    """Integer fields of /proc/self/status (kB values stay in kB); 0 where absent (a
    system without /proc)."""
    found = dict.fromkeys(names, 0)
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in found:
            found[key] = int(value.split()[0])
    return found


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def process_stats(service: str, instance_id: str, started: float) -> runtime_pb2.RuntimeStats:
    """This process now (called on its event loop)."""
    status = _status_fields("VmRSS", "Threads")
    return runtime_pb2.RuntimeStats(
        service=service,
        instance_id=instance_id,
        pid=os.getpid(),
        rss_bytes=status["VmRSS"] * 1024,
        open_fds=open_fds(),
        asyncio_tasks=len(asyncio.all_tasks()),
        threads=status["Threads"],
        uptime_s=time.monotonic() - started,
    )


class RuntimeServicer(runtime_pb2_grpc.RuntimeServiceServicer):
    """Platform admins only; any caller where the service authenticates no one (the
    static-key hook with no keys: development)."""

    def __init__(self, service: str, instance_id: str, *, open_to_anonymous: bool) -> None:
        self._service = service
        self._instance_id = instance_id
        self._open = open_to_anonymous
        self._started = time.monotonic()

    async def GetRuntimeStats(
        self, request: runtime_pb2.GetRuntimeStatsRequest, context: Any
    ) -> runtime_pb2.RuntimeStats:
        caller = current_principal.get()
        allowed = (isinstance(caller, AuthPrincipal) and caller.platform_admin) or (
            self._open and caller.anonymous and not isinstance(caller, AuthPrincipal)
        )
        if not allowed:
            raise PermissionDenied("runtime statistics need a platform-admin key")
        return process_stats(self._service, self._instance_id, self._started)
