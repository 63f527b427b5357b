"""The gateway's HTTP transport joins the writes of one loop iteration (uvicorn's head + body)."""

from __future__ import annotations

import asyncio

from unimodel.gateway.http_protocol import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_of_one_iteration_become_one_write() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]  # RecordingTransport records writes in place of an asyncio.Transport
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t.write(b"")
    t.write(b"ok")
    assert raw.writes == [] and t.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    t.writelines([b"a", b"b"])
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"ab"
    assert t.get_extra_info("peername") == "info:peername"  # everything else goes to the real transport


async def test_close_sends_what_was_written_first() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]  # RecordingTransport records writes in place of an asyncio.Transport
    t.write(b"last words")
    t.close()
    assert raw.writes == [b"last words"] and raw.closed
    await asyncio.sleep(0)
    assert raw.writes == [b"last words"]  # nothing twice
