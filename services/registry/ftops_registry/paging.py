"""Opaque page tokens for the registry's list RPCs (an integer position, base64-wrapped)."""

from __future__ import annotations

import base64

from ftops_runtime.errors import InvalidArgument


def encode_token(value: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{value}".encode()).decode()


def decode_token(token: str) -> int:
    """Page tokens are opaque to clients; a bad one is the client's mistake."""
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "v1":
            raise ValueError(kind)
        return int(value)
    except ValueError:
        raise InvalidArgument(f"page_token {token!r} is not one this server issued") from None
