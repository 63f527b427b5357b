"""Optional API keys: bearer tokens mapped to tenant names (settings `api_keys`), on every gateway route
but health (and the static /chat page, whose own API calls carry the key).

Off (no keys configured): nothing is checked; a trusted caller may name its tenant with the
`x-unimodel-tenant` header. On: `Authorization: Bearer <key>` (or `x-api-key: <key>`) must name a
configured key, else 401 in OpenAI's error shape; the key's tenant replaces any x-unimodel-tenant
header, so every route reads the verified tenant from that header and it travels with the request
(BatchItem.tenant) to every service. gRPC: the same check on `authorization` metadata.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from unimodel.core import errors
from unimodel.gateway.settings import KeyPolicy

TENANT_HEADER = "x-unimodel-tenant"
_TENANT = TENANT_HEADER.encode()
OPEN_PATHS = ("/health/",)
OPEN_PAGES = frozenset({"/chat", "/chat/"})
OPEN_GRPC = ("/grpc.health.v1.", "/grpc.reflection.")
PRINCIPAL_KEY = "unimodel.principal"
"""The ASGI scope entry (and gRPC context attribute) holding the caller's verified Principal."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the presented key says."""

    name: str
    """The tenant's name for a tenant key, the admin's name for an admin key, "anonymous" with no keys."""
    tenant: str
    """Cache scope and queue share the request uses ("" for the shared scope)."""
    admin: bool
    """May administer: register / unload models, every cache scope, full configs, KServe priority."""
    key_id: str
    """Stable, non-secret id of the key (rate-limit buckets, logs); "" with no keys."""
    policy: KeyPolicy | None = None
    """The key's limits (None: the settings' defaults)."""


ANONYMOUS = Principal("anonymous", "", admin=True, key_id="")
"""The caller when no keys are configured (loopback-only unless insecure_open): one user, who administers."""


class ApiKeys:
    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = {k: v for k, v in keys.items() if k}
        self.enabled = bool(self.keys)

    def tenant(self, authorization: str, api_key: str = "") -> str:
        """The tenant of the presented key; Unauthenticated when it is missing or unknown."""
        token = ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        token = token or api_key.strip()
        if not token:
            raise errors.Unauthenticated("missing API key: send Authorization: Bearer <key>")
        for key, tenant in self.keys.items():  # constant-time comparison per key
            if hmac.compare_digest(key.encode(), token.encode()):
                return tenant
        raise errors.Unauthenticated("invalid API key")

    def tenant_from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """gRPC: the tenant of the call's `authorization` (or `x-api-key`) metadata; '' when auth is off
        (then an `x-unimodel-tenant` entry names it)."""
        md = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in (metadata or ())}
        if not self.enabled:
            return md.get(TENANT_HEADER, "")
        return self.tenant(md.get("authorization", ""), md.get("x-api-key", ""))


class AuthMiddleware:
    """Outer ASGI layer: checks the key, rewrites x-unimodel-tenant to the key's tenant. A refusal is
    401 with `error_body(err)` (app.py gives OpenAI's shape, which every OpenAI client parses)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, error_body: Callable[[errors.UnimodelError], bytes]) -> None:
        self.app, self.keys, self.error_body = app, keys, error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            not self.keys.enabled or scope["type"] not in ("http", "websocket")
            or path.startswith(OPEN_PATHS) or path in OPEN_PAGES
        ):
            await self.app(scope, receive, send)
            return
        authorization = api_key = ""
        kept = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == _TENANT:
                continue  # only the key decides the tenant
            kept.append((name, value))
        try:
            tenant = self.keys.tenant(authorization, api_key)
        except errors.UnimodelError as err:
            if scope["type"] == "websocket":  # refused before the handshake completes: HTTP 403 to the client
                await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
                return
            body = self.error_body(err)
            await send({
                "type": "http.response.start", "status": 401,
                "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="unimodel"'),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        kept.append((_TENANT, tenant.encode()))
        scope = dict(scope)
        scope["headers"] = kept
        await self.app(scope, receive, send)


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: every method but health and reflection needs a configured key (UNAUTHENTICATED otherwise).
    Servicers read the tenant with ApiKeys.tenant_from_metadata."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_GRPC):
            return await continuation(handler_call_details)
        try:
            self.keys.tenant_from_metadata(handler_call_details.invocation_metadata)
        except errors.UnimodelError as exc:
            return _deny(exc, await continuation(handler_call_details))
        return await continuation(handler_call_details)


def _deny(err: errors.UnimodelError, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    from unimodel.core.grpc_server import status_trailers

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, err.message, trailing_metadata=status_trailers(err))

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, err.message, trailing_metadata=status_trailers(err))
        yield  # pragma: no cover  (makes this an async generator for server-streaming methods)

    deserializer = handler.request_deserializer if handler else None
    serializer = handler.response_serializer if handler else None
    streams_in = handler is not None and handler.request_streaming
    streams_out = handler is not None and handler.response_streaming
    if streams_in and streams_out:
        return grpc.stream_stream_rpc_method_handler(abort_stream, deserializer, serializer)
    if streams_in:
        return grpc.stream_unary_rpc_method_handler(abort, deserializer, serializer)
    if streams_out:
        return grpc.unary_stream_rpc_method_handler(abort_stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(abort, deserializer, serializer)
