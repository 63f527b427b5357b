"""gRPC server of a service: health (grpc.health.v1), reflection, and error mapping for our servicers."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unimodel.core import errors, grpc_decode

log = logging.getLogger("unimodel.grpc")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_trailers(err: errors.UnimodelError) -> tuple[tuple[str, bytes], ...]:
    """grpc-status-details-bin with a google.rpc.Status holding our ErrorDetail."""
    detail = any_pb2.Any()
    detail.Pack(err.to_proto())
    status = status_pb2.Status(code=err.grpc_status.value[0], message=err.message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


def refusing_handler(
    err: errors.UnimodelError, handler: grpc.RpcMethodHandler | None,
    extra_trailers: tuple[tuple[str, str | bytes], ...] = (),
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming, each way) that answers every call with
    `err`: its status, message and details (status_trailers), plus `extra_trailers`. For interceptors that
    refuse a call before the servicer runs (API keys, rate limits)."""
    trailers = (*status_trailers(err), *extra_trailers)

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(err.grpc_status, err.message, trailing_metadata=trailers)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(err.grpc_status, err.message, trailing_metadata=trailers)
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


def maps_errors(method: F) -> F:
    """Servicer method decorator: UnimodelError -> status + details; anything else -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except errors.UnimodelError as exc:
            err = exc
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("gRPC method %s failed", method.__name__)
            err = errors.Internal("internal error")
        await context.abort(err.grpc_status, err.message, trailing_metadata=status_trailers(err))

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps method's signature; mypy cannot see it is F


LIVENESS = "liveness"
"""gRPC health service name that says whether the process is alive (Kubernetes' livenessProbe and startupProbe
ask for it: `grpc: {port, service: liveness}`); the overall status ("") says whether it is ready."""


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A service's gRPC server: health, reflection and the servicers `add`ed to it.

    The grpc.aio server itself is made when it is first needed (`start()`, or reading `server`), not when
    the service is built. Making one initialises gRPC's asyncio layer (gRPC Core and its poller thread),
    and one that never started cannot be stopped (stop() leaves it as it is) and its __dealloc__ logs
    through grpc's module logger. A service built and never started (the unit tests build services
    in process; module-level caches such as FastAPI's, which holds the gateway's route endpoints, keep
    them alive to the end) was freed by the interpreter's last garbage collection at exit, after grpc's
    module globals were cleared: that __dealloc__ then failed, and CPython, reporting it through a
    sys.excepthook that was gone too, printed 'Error in sys.excepthook' at exit.
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        self.host, self.requested_port = host, port
        self.port = 0
        self._interceptors = interceptors or None
        self._options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]] = [
            (health_pb2_grpc.add_HealthServicer_to_server, self.health)
        ]
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    @property
    def server(self) -> grpc.aio.Server:
        """The grpc.aio server with every servicer added so far (made on first use, in the running loop)."""
        if self._server is None:
            server = grpc.aio.server(interceptors=self._interceptors, options=self._options)
            for add_fn, servicer in self._servicers:
                add_fn(servicer, server)
            self._server = server
        return self._server

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        add_fn = grpc_decode.guarded(add_fn, status_trailers(grpc_decode.ERROR))  # a request that does not decode: INVALID_ARGUMENT
        self._servicers.append((add_fn, servicer))
        if self._server is not None:
            add_fn(servicer, self._server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        server = self.server
        try:
            reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], server)
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
            if self.port == 0:
                raise OSError(f"cannot bind gRPC to {self.host}:{self.requested_port}")
        except BaseException:
            self._server = None  # it never started: let it go now, while the interpreter is whole
            raise
        await server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool, *, live: bool | None = None) -> None:
        """Readiness: the overall status ("") and every service's. `live` (default: the same): LIVENESS's, which a
        process keeps SERVING while it runs, even while it is not ready (a worker loading its models)."""
        for name in ("", *self._service_names):
            await self.health.set(name, _status(serving))
        await self.health.set(LIVENESS, _status(serving if live is None else live))

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        if self._server is not None:  # None: never made (the service never started), nothing to stop
            await self._server.stop(grace_s)
