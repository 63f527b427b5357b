"""What the gateway reads from an HTTP request: its RequestContext (x-request-id, W3C trace context and the
verified tenant: auth.py rewrote x-unimodel-tenant, with the route's deadline), and for the raw-ASGI routes
(fast_path.py, KServe infer) its body."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.types import Receive

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.gateway.auth import TENANT_HEADER


def http_context(header: Callable[[str], str], timeout_s: float) -> RequestContext:
    """`header(name)`: the request's header value, "" when absent."""
    return RequestContext.new(
        timeout_s, request_id=header("x-request-id"), traceparent=header("traceparent"),
        tracestate=header("tracestate"), tenant=header(TENANT_HEADER),
    )


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
