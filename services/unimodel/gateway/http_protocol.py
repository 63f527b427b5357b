"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers when the app sends `http.response.start`, and the
body when it sends `http.response.body`: two `write()` system calls per answer, each of which, on a local
connection, runs the receiver's TCP stack too. The transport wrapper below keeps what is written during
one event-loop iteration and hands it to the real transport in one call at the end of the iteration, so a
response sent in one step (our infer routes, and most small answers) costs one system call. Streaming
responses still flow: each iteration's writes go out at its end. Writes that add up to more than JOIN_LIMIT
bytes are handed over one by one, never joined: a big answer (fast_path.py sends it in 1 MiB slices of a
mapped file) is not copied whole on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

JOIN_LIMIT = 256 * 1024
"""Pending writes up to this many bytes in all are joined into one write; bigger ones go out one by one."""


class CoalescingTransport:
    """Proxy of an asyncio transport whose `write`s are joined until the end of the loop iteration."""

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes | memoryview] = []
        self._size = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._size += len(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, size, self._pending, self._size = self._pending, self._size, [], 0
        if not pending or self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        elif size <= JOIN_LIMIT:
            self._transport.write(b"".join(pending))
        else:  # not writelines: asyncio's own joins them (uvloop's does not)
            for chunk in pending:
                self._transport.write(chunk)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def close(self) -> None:
        self._flush()  # what was written before close still goes out
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._size = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, set_protocol, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    # uvicorn types its parameter as asyncio.Transport (narrower than BaseProtocol's BaseTransport), and
    # CoalescingTransport is a stand-in that delegates to one, not a subclass
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # see above
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]  # see above
