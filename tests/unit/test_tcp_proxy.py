"""The chaos suite's TCP proxy: forwards both ways, a cut resets open connections and
refuses new ones, a restore accepts again on the same port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from ftops_devstack.proxy import TcpProxy


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            pass  # the proxy's cut resets its side too
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()


async def _read_or_reset(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(10)
    except ConnectionResetError:
        return b""


async def test_forwards_cuts_and_restores(echo: int) -> None:
    proxy = TcpProxy("127.0.0.1", echo)
    proxy.start()
    try:
        big = bytes(range(256)) * 1024  # 256 KiB: several chunks each way
        assert await _roundtrip(proxy.port, big) == big

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await asyncio.to_thread(proxy.cut)
        assert proxy.is_cut
        # The open connection is reset; a new one is refused.
        # The open connection was reset: the read ends at once, with no echo.
        assert await asyncio.wait_for(_read_or_reset(reader), 5) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)

        await asyncio.to_thread(proxy.restore)
        assert await _roundtrip(proxy.port, b"back") == b"back"
        assert proxy.cuts == 1
        assert proxy.connections_total == 3
    finally:
        await asyncio.to_thread(proxy.stop)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), 1).close()


async def test_a_dead_server_behind_it_fails_the_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = TcpProxy("127.0.0.1", dead)
    proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(_read_or_reset(reader), 5) == b""
        writer.close()
    finally:
        await asyncio.to_thread(proxy.stop)
