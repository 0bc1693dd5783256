"""The client channel attaches the API key and trace context to every kind of call."""

from __future__ import annotations

import grpc

from ftops_runtime.client import channel


async def test_every_call_kind_gets_an_interceptor() -> None:
    # grpc.aio files an interceptor under the first call kind it implements: one per kind
    # is needed, or streaming calls would go out without the key.
    ch = channel("127.0.0.1:1", api_key="k")
    try:
        kinds = {
            "unary_unary": ch._unary_unary_interceptors,
            "unary_stream": ch._unary_stream_interceptors,
            "stream_unary": ch._stream_unary_interceptors,
            "stream_stream": ch._stream_stream_interceptors,
        }
        assert all(len(found) == 1 for found in kinds.values()), kinds
        assert isinstance(ch, grpc.aio.Channel)
    finally:
        await ch.close()
