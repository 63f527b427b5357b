"""The RequestContext of an HTTP request: its x-request-id, W3C trace context and verified tenant
(auth.py rewrote x-unimodel-tenant), with the route's deadline."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
