"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers when the app sends `http.response.start`, and the
body when it sends `http.response.body`: two `write()` system calls per answer, each of which, on a local
connection, runs the receiver's TCP stack too. The transport wrapper below keeps what is written during
one event-loop iteration and hands it to the real transport in one call at the end of the iteration, so a
response sent in one step (our infer routes, and most small answers) costs one system call. Streaming
responses still flow: each iteration's writes go out at its end.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Proxy of an asyncio transport whose `write`s are joined until the end of the loop iteration."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(c) for c in self._pending)

    def close(self) -> None:
        self._flush()  # what was written before close still goes out
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, set_protocol, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    # uvicorn types its parameter as asyncio.Transport (narrower than BaseProtocol's BaseTransport), and
    # CoalescingTransport is a stand-in that delegates to one, not a subclass
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # see above
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]  # see above
