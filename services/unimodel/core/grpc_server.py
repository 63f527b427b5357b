"""gRPC server of a service: health (grpc.health.v1), reflection, and error mapping for our servicers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unimodel.core import errors

log = logging.getLogger("unimodel.grpc")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_trailers(err: errors.UnimodelError) -> tuple[tuple[str, bytes], ...]:
    """grpc-status-details-bin with a google.rpc.Status holding our ErrorDetail."""
    detail = any_pb2.Any()
    detail.Pack(err.to_proto())
    status = status_pb2.Status(code=err.grpc_status.value[0], message=err.message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


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

    return wrapper  # type: ignore[return-value]


class GrpcServer:
    def __init__(
        self,
        host: str,
        port: int,
        max_message_bytes: int = 64 * 1024 * 1024,
        interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        self.host, self.requested_port = host, port
        self.port = 0
        self.server = grpc.aio.server(
            interceptors=interceptors or None,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {self.host}:{self.requested_port}")
        await self.server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
