"""Status names reported per request, and which failures are the request's own fault."""

from __future__ import annotations

import grpc

from ftops_runtime.errors import FtopsError

# Failures caused by the request itself: another version would fail it the same way, so
# they neither fall back to the stable version nor count against the candidate.
CLIENT_FAULTS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "CANCELLED"})


def status_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, FtopsError):
        return str(exc.code.name)
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"
