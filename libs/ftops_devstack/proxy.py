"""A TCP proxy that can cut a dependency off (issue 17's chaos faults).

Services are pointed at the proxy instead of the server (NATS, Postgres); ``cut()`` makes
the server unreachable the way a stopped server or a lost route looks to a client: every
open connection is reset and new ones are refused (nothing listens on the port), while
the server itself keeps running with its state. ``restore()`` listens again on the same
port. The proxy runs on an event loop of its own in a daemon thread, so the caller's loop
(the load generator) neither carries its traffic nor delays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ftops_devstack.servers import free_port

T = TypeVar("T")
_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: what a peer sees when the server's
    host is gone or its process killed, not an orderly goodbye."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """``TcpProxy(target_host, target_port)``: ``start()``, then clients use ``port``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = free_port(host)
        self.connections_total = 0
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    # -- control, from any thread ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        self.cuts += 1
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again (on the same port)."""
        self._call(self._listen())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def is_cut(self) -> bool:
        return self._server is None

    @property
    def open_connections(self) -> int:
        return len(self._pipes) // 2

    def url(self, scheme: str) -> str:
        return f"{scheme}://{self.host}:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- on the proxy's loop -------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._pipes):
            _reset(writer)
        self._pipes.clear()
        if server is not None:
            # Python 3.11's wait_closed returns at once; closing is done once the
            # listening socket is gone (the port refuses connections from here on).
            await server.wait_closed()

    async def _shutdown(self) -> None:
        await self._cut()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(writer)  # the server itself is down: the client sees its connection fail
            return
        self.connections_total += 1
        self._pipes.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer, writer), self._pump(up_reader, writer, up_writer)
        )

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await src.read(_CHUNK):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended (or was reset by a cut): the other side ends with it.
            for w in (dst, src_writer):
                if w in self._pipes:
                    self._pipes.discard(w)
                    w.close()
