"""Domain errors that the error-mapping interceptor turns into gRPC status codes.

Service code raises these instead of touching grpc contexts, so the same logic can sit
behind gRPC, HTTP or a test without knowing about transports.
"""

from __future__ import annotations

import grpc


class FtopsError(Exception):
    """Base class: carries the gRPC status code the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


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


class Unauthenticated(FtopsError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FtopsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(FtopsError):
    code = grpc.StatusCode.DATA_LOSS


class RemoteError(FtopsError):
    """A status relayed from another service (e.g. an answer on a multiplexed stream): it
    keeps the remote code and message, as a failed downstream gRPC call does."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PermanentEventError(Exception):
    """An event that can never be handled (malformed, contradictory): dead-letter it."""
