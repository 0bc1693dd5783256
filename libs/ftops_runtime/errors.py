"""Domain errors that the error-mapping interceptor turns into gRPC status codes.

Service code raises these instead of touching grpc contexts, so the same logic can sit
behind gRPC, HTTP or a test without knowing about transports.
"""

from __future__ import annotations

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


class FtopsError(Exception):
    """Base class: carries the gRPC status code the error maps to, and for a refusal how
    long the caller should wait before retrying (``retry_after_ms``, 0 = no advice; sent as
    the ``retry-after-ms`` trailing metadata and as HTTP ``Retry-After``)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, *args: object, retry_after_ms: int = 0) -> None:
        super().__init__(*args)
        self.retry_after_ms = max(0, int(retry_after_ms))


class InvalidArgument(FtopsError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FtopsError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FtopsError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FtopsError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(FtopsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FtopsError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FtopsError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(FtopsError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FtopsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(FtopsError):
    code = grpc.StatusCode.DATA_LOSS


class Internal(FtopsError):
    """A fault of the server's own (a version that fails), not of the caller or of load."""

    code = grpc.StatusCode.INTERNAL


class RemoteError(FtopsError):
    """A status relayed from another service (e.g. an answer on a multiplexed stream): it
    keeps the remote code and message, as a failed downstream gRPC call does."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.code = code


class PermanentEventError(Exception):
    """An event that can never be handled (malformed, contradictory): dead-letter it."""


def retry_after_ms_of(exc: BaseException) -> int:
    """The retry advice an error carries: a domain error's own, or a downstream call's
    ``retry-after-ms`` trailing metadata; 0 = none."""
    if isinstance(exc, FtopsError):
        return exc.retry_after_ms
    if isinstance(exc, grpc.aio.AioRpcError):
        for key, value in exc.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY and isinstance(value, str) and value.isdigit():
                return int(value)
    return 0


def retry_after_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that passes an error's retry advice on (empty without)."""
    wait_ms = retry_after_ms_of(exc)
    return ((RETRY_AFTER_KEY, str(wait_ms)),) if wait_ms else ()
