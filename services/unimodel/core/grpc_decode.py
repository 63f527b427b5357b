"""gRPC requests the protobuf runtime cannot decode answered INVALID_ARGUMENT, not UNKNOWN.

grpc.aio decodes a request with the method's deserializer before any servicer code (or interceptor
behaviour) runs, and answers UNKNOWN, logging the exception, when it raises: a message nested deeper than
the runtime's 100 levels (a google.protobuf.Value of deep arrays or objects) or malformed bytes.
`guarded(add_fn)` registers a servicer with, for each method, a deserializer that returns `UNDECODABLE`
instead of raising and a behaviour that aborts with INVALID_ARGUMENT (and our error details) when it gets
one. GrpcServer.add guards every servicer this way; the cost is one extra frame per call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from unimodel.core import errors

MESSAGE = (
    "the request could not be decoded: it is malformed, or nests deeper than the protobuf runtime decodes "
    "(100 levels of messages; a google.protobuf.Value may nest 32 levels of arrays and objects)"
)


class Undecodable:
    """What a guarded deserializer returns for bytes it cannot decode."""

    __slots__ = ()


UNDECODABLE = Undecodable()


def _guarded_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, and whatever else the runtime raises on bad bytes
            return UNDECODABLE

    return decode


ERROR = errors.InvalidArgument(MESSAGE)
Trailers = tuple[tuple[str, bytes], ...]


async def _abort(context: grpc.aio.ServicerContext, trailers: Trailers) -> None:
    await context.abort(ERROR.grpc_status, ERROR.message, trailing_metadata=trailers)


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, trailers: Trailers) -> AsyncIterator[Any]:
    async for request in requests:
        if request is UNDECODABLE:
            await _abort(context, trailers)
        yield request


async def _replies(result: Any) -> AsyncIterator[Any]:
    if hasattr(result, "__aiter__"):  # an async generator
        async for reply in result:
            yield reply
    else:  # a coroutine that writes with context.write
        await result


def guard(handler: grpc.RpcMethodHandler, trailers: Trailers) -> grpc.RpcMethodHandler:
    """`handler` with the guarded deserializer and a behaviour that refuses UNDECODABLE (aborting with ERROR
    and `trailers`, its status details). A handler without a deserializer gets the request's bytes, which
    always decode: it is returned as it is (no extra frame per call)."""
    if handler.request_deserializer is None:
        return handler
    deserializer = _guarded_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def one_to_one(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is UNDECODABLE:
                await _abort(context, trailers)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(one_to_one, deserializer, serializer)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def one_to_many(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is UNDECODABLE:
                await _abort(context, trailers)
            async for reply in _replies(unary_stream(request, context)):
                yield reply

        return grpc.unary_stream_rpc_method_handler(one_to_many, deserializer, serializer)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def many_to_one(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await stream_unary(_checked(requests, context, trailers), context)

        return grpc.stream_unary_rpc_method_handler(many_to_one, deserializer, serializer)
    stream_stream = handler.stream_stream

    async def many_to_many(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for reply in _replies(stream_stream(_checked(requests, context, trailers), context)):
            yield reply

    return grpc.stream_stream_rpc_method_handler(many_to_many, deserializer, serializer)


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc's stubs type the base class as Any
    """A generic handler whose methods are guarded (each guarded once, when first called)."""

    def __init__(self, inner: grpc.GenericRpcHandler, trailers: Trailers) -> None:
        self.inner, self.trailers = inner, trailers
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        found = self._guarded.get(method)
        if found is None:
            handler = self.inner.service(handler_call_details)
            if handler is None:
                return None  # not one of its methods
            found = self._guarded[method] = guard(handler, self.trailers)
        return found


class _GuardedServer:
    """What a generated add_*Servicer_to_server function sees: the server, handlers guarded on the way in."""

    def __init__(self, server: grpc.aio.Server, trailers: Trailers) -> None:
        self.server, self.trailers = server, trailers

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h, self.trailers) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        guarded = {name: guard(handler, self.trailers) for name, handler in method_handlers.items()}
        self.server.add_registered_method_handlers(service_name, guarded)


def guarded(add_fn: Callable[[Any, grpc.aio.Server], None], trailers: Trailers) -> Callable[[Any, grpc.aio.Server], None]:
    """A generated add_*Servicer_to_server function that registers the servicer's methods guarded;
    `trailers`: ERROR's status details (grpc_server.status_trailers)."""

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        add_fn(servicer, _GuardedServer(server, trailers))  # it calls only the two methods _GuardedServer has

    return add
