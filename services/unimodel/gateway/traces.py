"""The gateway's server spans: one per inference request on HTTP (ASGI middleware) and gRPC (interceptor).

Both start the span as a child of the caller's `traceparent` and hand the span's own traceparent to the
handlers the way they already read it (the HTTP `traceparent` header is replaced in the ASGI scope; for
gRPC, RequestContext.from_grpc reads `context.grpc_traceparent`), so every API propagates the trace
without code of its own. The HTTP span ends with the response's last body chunk, a stream's included;
the trace id goes back in `x-unimodel-trace-id` (HTTP header; gRPC metadata via `reply_metadata`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unimodel.core import tracing
from unimodel.core.context import RequestContext, grpc_traceparent
from unimodel.core.tracing import Attr

_TRACE_ID = tracing.TRACE_ID_HEADER.encode()
_TRACEPARENT = b"traceparent"
_REQUEST_ID = b"x-request-id"
CLIENT_ID_MAX = 200
"""Characters of a client's x-request-id kept in its server span's attribute."""

ROUTES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^/v1/models/(?P<model>[^/]+):predict$"), "/v1/models/{model}:predict"),
    (re.compile(r"^/v2/models/(?P<model>[^/]+?)(?:/versions/[^/]+)?/infer$"), "/v2/models/{model}/infer"),
    (re.compile(r"^/v1/chat/completions$"), "/v1/chat/completions"),
    (re.compile(r"^/v1/completions$"), "/v1/completions"),
    (re.compile(r"^/v1/embeddings$"), "/v1/embeddings"),
    (re.compile(r"^/v1/audio/transcriptions$"), "/v1/audio/transcriptions"),
    (re.compile(r"^/v1/audio/translations$"), "/v1/audio/translations"),
    (re.compile(r"^/modelcache$"), "/modelcache"),
)
"""The traced HTTP routes (inference and cache); health, metrics, model management are not traced."""

GRPC_METHODS = frozenset({
    "/unimodel.v1.InferenceService/Predict",
    "/unimodel.v1.InferenceService/Generate",
    "/unimodel.v1.InferenceService/GenerateUnary",
    "/inference.GRPCInferenceService/ModelInfer",
})


def http_route(path: str) -> tuple[str, str] | None:
    """(route template, model or "") of a traced path; None for the others."""
    for pattern, template in ROUTES:
        match = pattern.match(path)
        if match is not None:
            return template, match.groupdict().get("model") or ""
    return None


class _ServerSpan:
    """One request's span and the `send` that ends it with the response's last body chunk."""

    __slots__ = ("span", "send", "trace_id", "status", "ended")

    def __init__(self, span: tracing.Span, send: Send) -> None:
        self.span, self.send = span, send
        self.trace_id = tracing.trace_id_of(span).encode()
        self.status = 0
        self.ended = False

    async def traced_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), (_TRACE_ID, self.trace_id)]}
            await self.send(message)
            return
        await self.send(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            self.end()

    def end(self, error: BaseException | str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        status = self.status
        if status:
            self.span.set_attribute(Attr.HTTP_STATUS, status)
        if error is None and status >= 500:
            error = str(status)
        tracing.finish(self.span, error)


class TracingMiddleware:
    """ASGI: a SERVER span around each traced HTTP request (nothing at all while tracing is off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = http_route(scope["path"]) if scope["type"] == "http" and tracing.enabled() else None
        if route is None:
            await self.app(scope, receive, send)
            return
        template, model = route
        method = scope["method"]
        headers = scope["headers"]
        parent = client_id = ""
        for key, value in headers:
            if key == _TRACEPARENT:
                parent = value.decode("latin-1")
            elif key == _REQUEST_ID:
                client_id = value.decode("latin-1")
        if parent:
            headers = [(k, v) for k, v in headers if k != _TRACEPARENT]
        attributes = {Attr.HTTP_METHOD: method, Attr.HTTP_ROUTE: template, Attr.URL_PATH: scope["path"]}
        if model:
            attributes[Attr.MODEL] = model
        if client_id:  # logged with the trace; the request id is ours (RequestContext)
            attributes[Attr.CLIENT_REQUEST_ID] = client_id[:CLIENT_ID_MAX]
        span = tracing.start(f"{method} {template}", parent, tracing.SERVER, attributes, root=True)
        if span is None:  # not sampled: the request goes on as it came
            await self.app(scope, receive, send)
            return
        # the handlers read the traceparent header: from here on it names the server span
        scope["headers"] = [*headers, (_TRACEPARENT, tracing.traceparent_of(span).encode())]
        server = _ServerSpan(span, send)
        try:
            await self.app(scope, receive, server.traced_send)
        except BaseException as exc:
            server.end(exc)
            raise
        finally:
            server.end()


class GrpcTracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around each inference RPC (GRPC_METHODS); the handlers see it through
    RequestContext.from_grpc and return its trace id with `reply_metadata`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in GRPC_METHODS or not tracing.enabled():
            return handler
        method = details.method
        service, _, name = method[1:].rpartition("/")
        parent = client_id = ""
        for key, value in details.invocation_metadata or ():
            if key == "traceparent":
                parent = value if isinstance(value, str) else value.decode()
            elif key == "x-request-id":
                client_id = value if isinstance(value, str) else value.decode("latin-1")
        attributes = {Attr.RPC_SYSTEM: "grpc", Attr.RPC_SERVICE: service, Attr.RPC_METHOD: name}
        if client_id:  # logged with the trace; the request id is ours (RequestContext)
            attributes[Attr.CLIENT_REQUEST_ID] = client_id[:CLIENT_ID_MAX]

        def begin() -> tuple[Any, Any]:
            span = tracing.start(method[1:], parent, tracing.SERVER, attributes, root=True)
            return span, grpc_traceparent.set(tracing.traceparent_of(span) if span is not None else parent)

        def end(span: Any, context: grpc.aio.ServicerContext, error: BaseException | str | None) -> None:
            if span is None:
                return
            code = context.code() if hasattr(context, "code") else None
            if code is not None and not isinstance(code, int):
                span.set_attribute(Attr.RPC_GRPC_STATUS, code.value[0])
                if code != grpc.StatusCode.OK and error is None:
                    error = code.name
            tracing.finish(span, error)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                span, token = begin()
                error = None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    grpc_traceparent.reset(token)
                    end(span, context, error)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                span, token = begin()
                error = None
                try:
                    async for message in stream_behavior(request, context):
                        yield message
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    grpc_traceparent.reset(token)
                    end(span, context, error)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        return handler


def reply_metadata(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
    """gRPC metadata of an answer: the request id (the caller's own x-request-id when it sent one, ours
    then in x-unimodel-request-id, as on HTTP), and the trace id of a sampled request."""
    ids: tuple[tuple[str, str], ...] = (("x-request-id", ctx.request_id),)
    if ctx.client_request_id:
        ids = (("x-request-id", ctx.client_request_id), ("x-unimodel-request-id", ctx.request_id))
    parent = tracing.parse_traceparent(ctx.traceparent) if ctx.traceparent and tracing.enabled() else None
    if parent is not None and parent.sampled:
        return (*ids, (tracing.TRACE_ID_HEADER, ctx.trace_id))
    return ids
