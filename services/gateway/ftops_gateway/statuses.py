"""Status names reported per request, which failures are the request's own fault, and
where a failure arose (``RequestResult.failure_origin``)."""

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


# Failures of the platform under load rather than of the version that served the request.
_PLATFORM_ORIGINS = {
    # A replica's queue (full, or longer than the request's deadline) or the rate limit.
    "RESOURCE_EXHAUSTED": "capacity",
    # No replica reachable, a replica draining or restarting, a connection lost.
    "UNAVAILABLE": "transport",
    # The gateway's deadline (or the caller's) passed.
    "DEADLINE_EXCEEDED": "deadline",
}


def failure_origin(status: str) -> str:
    """Where a failure with this status arose: "capacity", "transport", "deadline", or
    "replica" for the version's own errors; empty for OK. (The monitor keeps a client's
    fault, INVALID_ARGUMENT and the like, apart by its status whatever the origin.)"""
    if status == "OK":
        return ""
    return _PLATFORM_ORIGINS.get(status, "replica")
