"""What the gateway reads from an HTTP request: its RequestContext (a new request id of ours, the client's
x-request-id apart as client_request_id, W3C trace context and the
verified tenant: auth.py rewrote x-unimodel-tenant, with the route's deadline), and for the raw-ASGI routes
(fast_path.py, KServe infer) its body (a big body into a file, spool.py) and how their answers are sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.types import Receive, Send

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.gateway.auth import TENANT_HEADER
from unimodel.gateway.pacing import Pacer
from unimodel.gateway.spool import Buffer, SpooledBody

SEND_SLICE = 256 * 1024
"""A bigger answer is sent in slices of this many bytes: no write joins or copies it whole, and each write is short
enough for other requests to be served between two (see payload_limits.BLOB_CHUNK_BYTES)."""


def http_context(header: Callable[[str], str], timeout_s: float) -> RequestContext:
    """`header(name)`: the request's header value, "" when absent."""
    return RequestContext.new(
        timeout_s, traceparent=header("traceparent"), tracestate=header("tracestate"), tenant=header(TENANT_HEADER),
        client_request_id=header("x-request-id"),  # echoed and logged; the request id is ours
    )


OUR_ID_HEADER = "x-unimodel-request-id"
"""Our request id, in answers to a client that sent its own x-request-id (which `x-request-id` echoes)."""


def id_headers(ctx: RequestContext) -> dict[str, str]:
    """The request id headers of an answer: `x-request-id` echoes the client's own id when it sent one
    (else it is ours), and `x-unimodel-request-id` then gives ours, the one in the logs and traces."""
    if ctx.client_request_id:
        return {"x-request-id": ctx.client_request_id, OUR_ID_HEADER: ctx.request_id}
    return {"x-request-id": ctx.request_id}


def raw_id_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """id_headers for the raw-ASGI routes (latin-1, as the client's header came)."""
    if ctx.client_request_id:
        return [(b"x-request-id", ctx.client_request_id.encode("latin-1", "replace")), (OUR_ID_HEADER.encode(), ctx.request_id.encode())]
    return [(b"x-request-id", ctx.request_id.encode())]


def starlette_header(headers: Mapping[str, str]) -> Callable[[str], str]:
    """`header` for a Starlette Headers mapping."""
    return lambda name: headers.get(name, "")


async def read_body(receive: Receive) -> bytes:
    """The whole body of an ASGI request; Cancelled when the client disconnects first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.Cancelled("client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body_spooled(receive: Receive, spool_from: int, expected: int = 0, rate: float = 0) -> bytes | SpooledBody:
    """read_body, but a body of `spool_from` bytes or more (0: never) goes into a file (spool.py) chunk by chunk
    as it arrives, never joined in memory, read at most `rate` bytes per second (pacing.py; 0: unpaced).
    `expected`: its Content-Length when given (0: unknown), to start the file at once. The file is the caller's
    to close; here only on failure (disconnect, cancellation, a body over the limit)."""
    pacer = Pacer(rate)
    chunks: list[bytes] = []
    size = 0
    spooled = SpooledBody("input", expected) if spool_from and expected >= spool_from else None
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise errors.Cancelled("client disconnected")
            chunk = message.get("body", b"")
            if spooled is not None:
                spooled.write(chunk)
                if rate:
                    await pacer.after(len(chunk))
            else:
                chunks.append(chunk)
                size += len(chunk)
                if spool_from and size >= spool_from:  # no (or a wrong) Content-Length: spooled from here
                    spooled = SpooledBody("input", size)
                    for early in chunks:
                        spooled.write(early)
                    chunks = []
            if not message.get("more_body", False):
                break
    except BaseException:
        if spooled is not None:
            spooled.close()
        raise
    if spooled is not None:
        return spooled.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], payload: Buffer, rate: float = 0) -> None:
    """Send a whole answer (`headers` without content-length: added here); a big one in slices of SEND_SLICE
    bytes (uvicorn's flow control applies between them), past its first pacing.BURST bytes at most `rate` bytes
    per second (0: unpaced)."""
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
    if len(payload) <= SEND_SLICE:
        await send({"type": "http.response.body", "body": payload})
        return
    view = memoryview(payload)
    pacer = Pacer(rate)
    for start in range(0, len(view), SEND_SLICE):
        if start:  # the transport writes this slice before the next (http_protocol.py), on schedule (pacing.py)
            await pacer.after(SEND_SLICE)
        end = start + SEND_SLICE
        await send({"type": "http.response.body", "body": view[start:end], "more_body": end < len(view)})
