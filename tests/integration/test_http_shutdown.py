"""A stopping gateway loses no request sent on a keep-alive connection (gateway/http_protocol.py): a request
that was on its way when the server began to stop, or right after a streamed answer ended, is answered with
Connection: close instead of finding its connection reset. Real uvicorn server, raw HTTP/1.1 client."""

from __future__ import annotations

import asyncio
import socket
import time

import uvicorn

from unimodel.gateway.http_protocol import LINGER_S, CoalescingHttpToolsProtocol


async def app(scope, receive, send):  # type: ignore[no-untyped-def]  # a bare ASGI app
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/stream":
        for i in range(3):
            await send({"type": "http.response.body", "body": f"part {i}\n".encode(), "more_body": True})
            await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"done\n"})


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def serve() -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", http=CoalescingHttpToolsProtocol, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, sock.getsockname()[1]


def test_requests_sent_while_the_server_stops_are_answered_with_connection_close() -> None:
    async def main() -> None:
        server, task, port = await serve()
        streaming = await asyncio.open_connection("127.0.0.1", port)
        idle = await asyncio.open_connection("127.0.0.1", port)
        quiet = await asyncio.open_connection("127.0.0.1", port)
        for reader, writer in (idle, quiet):  # keep-alive connections with one answer behind them
            writer.write(request("/"))
            assert (await read_response(reader))[1] == b"done\n"

        streaming[1].write(request("/stream"))
        first = await asyncio.wait_for(streaming[0].readuntil(b"\r\n\r\n"), 5)
        assert b"connection: close" not in first.lower()  # sent before the stop began
        server.should_exit = True
        await asyncio.sleep(0.15)  # the stop has begun: the listener is closed, connections told

        # an idle connection's client sends its next request now (it cannot know): answered, then closed
        idle[1].write(request("/"))
        head, body = await asyncio.wait_for(read_response(idle[0]), 5)
        assert body == b"done\n" and b"connection: close" in head.lower()
        assert await asyncio.wait_for(idle[0].read(), 5) == b""

        # the streamed answer ends; the next request, sent at once on the same connection, is answered too
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += await asyncio.wait_for(streaming[0].read(4096), 5)
        streaming[1].write(request("/"))
        head, body = await asyncio.wait_for(read_response(streaming[0]), 5)
        assert body == b"done\n" and b"connection: close" in head.lower()
        assert await asyncio.wait_for(streaming[0].read(), 5) == b""

        # a connection that sends nothing is closed after the linger, and the server stops
        started = time.monotonic()
        assert await asyncio.wait_for(quiet[0].read(), 5) == b""
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < LINGER_S + 1.0
        for _, writer in (streaming, idle, quiet):
            writer.close()

    asyncio.run(main())
