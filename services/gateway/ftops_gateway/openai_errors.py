"""Errors of the OpenAI-compatible endpoint in OpenAI's JSON shape, with the HTTP status an
OpenAI client expects for each gRPC status code of the data plane, and for a refusal how
long to wait (``Retry-After`` in whole seconds, rounded up, and ``retry-after-ms``, which
the official SDKs read first)."""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc

from ftops_runtime.errors import FtopsError, retry_after_ms_of

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). OpenAI clients branch on the HTTP
# status (429 and 5xx are retried by the official SDKs), so these matter more than text.
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    # e.g. a version its evaluation gate rejected: retrying will not help.
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class OpenAIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_ms = retry_after_ms

    def headers(self) -> dict[str, str]:
        """Retry advice on a refusal (429, 503): the server's own, or 1 s without one."""
        if self.status not in (429, 503):
            return {}
        wait_ms = self.retry_after_ms or 1000
        return {"Retry-After": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def from_status(code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> OpenAIError:
    status, kind = _STATUS.get(code, (500, "server_error"))
    error_code = "model_not_found" if code == grpc.StatusCode.NOT_FOUND else code.name.lower()
    return OpenAIError(
        status, message or code.name, type=kind, code=error_code, retry_after_ms=retry_after_ms
    )


def from_exception(exc: BaseException) -> OpenAIError:
    """The OpenAI error for anything the data plane raised. Unknown errors are logged
    with their traceback and answered without details (as the gRPC path does)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, FtopsError):
        return from_status(exc.code, str(exc), retry_after_ms_of(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_status(exc.code(), exc.details() or "", retry_after_ms_of(exc))
    log.error("unhandled error in the OpenAI endpoint", exc_info=exc)
    return OpenAIError(500, "internal error", type="server_error", code="internal")
