"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers when the app sends `http.response.start`, and the
body when it sends `http.response.body`: two `write()` system calls per answer, each of which, on a local
connection, runs the receiver's TCP stack too. The transport wrapper below keeps what is written during
one event-loop iteration and hands it to the real transport in one call at the end of the iteration, so a
response sent in one step (our infer routes, and most small answers) costs one system call. Streaming
responses still flow: each iteration's writes go out at its end. Writes that add up to more than JOIN_LIMIT
bytes are handed over one by one, never joined: a big answer (fast_path.py sends it in 256 KiB slices of a
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


LINGER_S = 0.5
"""On shutdown, how long a connection whose answer has ended stays open for a request its client may have sent
already (see CoalescingHttpToolsProtocol.shutdown)."""


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a CoalescingTransport and closing keep-alive connections
    without losing a request on shutdown.

    uvicorn closes an idle connection at once when the server stops, and a busy one right after its answer.
    A client on a keep-alive connection cannot know that: if it sent its next request just before the close
    (a stream ended and the next request left at once), that request finds the connection reset after it was
    sent and fails, although the server would have answered it. So a stopping gateway keeps each connection
    open for LINGER_S after its last answer (idle ones from the stop) and answers what arrives meanwhile with
    `Connection: close`, after which the client opens its next connection elsewhere. The server's shutdown
    waits for these connections (at most LINGER_S longer)."""

    _draining = False

    # uvicorn types its parameter as asyncio.Transport (narrower than BaseProtocol's BaseTransport), and
    # CoalescingTransport is a stand-in that delegates to one, not a subclass
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # see above
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]  # see above

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._linger()
        elif not self.cycle.response_started:
            self.cycle.keep_alive = False  # its answer says Connection: close
        # an answer already under way (a stream) cannot say so: on_response_complete lingers after it

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn answers with Connection: close and closes after it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining and not self.transport.is_closing():
            self._linger()

    def _linger(self) -> None:
        """Close unless a request arrives within LINGER_S (arriving data cancels the timer)."""
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(LINGER_S, self.timeout_keep_alive_handler)
