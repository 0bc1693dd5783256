"""The one error type the client raises: a gRPC failure with the service and address."""

from __future__ import annotations

import grpc

# Details gRPC gives when the transport, not the server, failed (nothing listening, DNS).
_TRANSPORT_HINTS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "socket closed",
    "no connection",
    "unavailable: ipv4",
)


class FtopsClientError(Exception):
    """A call to an ftops service failed.

    ``code_name`` is the gRPC status name (``NOT_FOUND``, ``UNAVAILABLE``, ...),
    ``message`` the server's details, ``service`` and ``address`` say where the call went.
    ``unreachable`` is true when nothing answered at that address at all.
    """

    def __init__(
        self, code_name: str, message: str, address: str, service: str = "", *, unreachable: bool
    ) -> None:
        self.code_name = code_name
        self.message = message
        self.address = address
        self.service = service
        self.unreachable = unreachable
        super().__init__(str(self))

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, service: str, address: str) -> FtopsClientError:
        code = exc.code()
        details = exc.details() or ""
        unreachable = code == grpc.StatusCode.UNAVAILABLE and any(
            hint in details.lower() for hint in _TRANSPORT_HINTS
        )
        return cls(code.name, details, address, service, unreachable=unreachable)

    def __str__(self) -> str:
        where = f"{self.service} {self.address}".strip()
        if self.unreachable:
            return (
                f"UNAVAILABLE: cannot reach the {where} (is the stack running? "
                "start it with `ftops up`, or point at it with --"
                f"{self.service or 'gateway'} / FTOPS_{(self.service or 'gateway').upper()}"
                "_ADDRESS)"
            )
        return f"{self.code_name}: {self.message} ({where})"
