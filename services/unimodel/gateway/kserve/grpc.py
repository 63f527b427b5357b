"""KServe v2 / Open Inference Protocol gRPC surface of the gateway (protocol translation only).

Implements Triton's `inference.GRPCInferenceService` with the stubs generated in `tritonclient.grpc`, so
this server and any Triton client in the same process share one set of descriptors. Errors abort with
the status of our error tree and the message (tritonclient raises InferenceServerException with it),
plus our ErrorDetail in grpc-status-details-bin (core.grpc_server.maps_errors). Methods for features the
gateway does not have (repository control, shared memory, streaming, trace and log settings) answer
UNIMPLEMENTED. Which methods need an admin key: auth.GRPC_TENANT_METHODS (everything else is admin-only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from unimodel import __version__
from unimodel.core import errors, grpc_decode, subjects
from unimodel.core.context import RequestContext, now_ms
from unimodel.core.grpc_server import GrpcServer, maps_errors, status_trailers
from unimodel.gateway.config_views import tenant_view
from unimodel.gateway.kserve import codec, documents
from unimodel.gateway.ports import KServePorts
from unimodel.gateway.traces import reply_metadata

log = logging.getLogger("unimodel.grpc")
API = "kserve_grpc"  # the `api` label of the gateway's request metrics
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _check_name(model: str) -> None:
    if not model or not subjects.is_valid_model_name(model):
        raise errors.InvalidArgument(f"invalid model name {model!r}", field="model")


class Gather:
    """Holds the infer calls that arrive while others of this gateway wait for their answers, for at most
    `window_s`, then lets them all go in one event-loop iteration, so that they leave for the batcher as one
    ItemBundle (core/replies.py bundles the items of one iteration). grpc.aio hands the calls of one HTTP/2
    connection to the loop one completion at a time, spread over iterations, where uvicorn hands over every
    request its read found at once. A call alone (nothing else waiting) goes at once."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.waiting = 0  # calls between their hold and their answer
        self._open: asyncio.Future[None] | None = None

    async def hold(self) -> None:
        if self.window_s <= 0 or not self.waiting:
            return
        if self._open is None:
            loop = asyncio.get_running_loop()
            self._open = loop.create_future()
            loop.call_later(self.window_s, self._release)
        await asyncio.shield(self._open)  # a cancelled caller leaves the others waiting

    def _release(self) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            opened.set_result(None)


GATHER_WINDOW_S = 0.001
"""How long an infer call that arrives while others wait may be held for the ones after it (Gather). MLP at
concurrency 16 over gRPC, interleaved with the code before (with ModelInfer on bytes): 1 ms +8.8 % and +2.4 % infer/s
in two runs, p99 lower; 0.3 ms +1.9 %, no better than bytes alone (docs/benchmarks.md, gRPC front end, issue 19)."""


class KServeGrpcApi(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gw: KServePorts, gather_window_s: float = GATHER_WINDOW_S) -> None:
        self.gw = gw
        self.gather = Gather(gather_window_s)

    # health and metadata -------------------------------------------------------------------------
    @maps_errors
    async def ServerLive(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    @maps_errors
    async def ServerReady(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=all(self.gw.readiness().values()))

    @maps_errors
    async def ModelReady(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        # As Triton: an unknown model or version is simply not ready.
        name = request.name
        if not name or not subjects.is_valid_model_name(name) or not self.gw.model_ready(name):
            return service_pb2.ModelReadyResponse(ready=False)
        try:
            documents.check_version(self.gw.configs().get(name), name, request.version)
        except errors.NotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @maps_errors
    async def ServerMetadata(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerMetadataResponse:
        doc = documents.server_metadata(__version__)
        return service_pb2.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])

    @maps_errors
    async def ModelMetadata(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        _check_name(request.name)
        config = self.gw.configs().get(request.name)
        if config is None and not self.gw.model_ready(request.name):
            raise errors.NotFound(f"model {request.name!r} not found", model=request.name)
        documents.check_version(config, request.name, request.version)
        return documents.model_metadata_proto(request.name, config)

    @maps_errors
    async def ModelConfig(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        _check_name(request.name)
        config = self.gw.configs().get(request.name)
        if config is None:
            raise errors.NotFound(f"model {request.name!r} not found", model=request.name)
        documents.check_version(config, request.name, request.version)
        caller = self.gw.auth.principal_from_metadata(context.invocation_metadata())
        # a tenant key: without file names and options (config_views.py); an admin key: in full
        return service_pb2.ModelConfigResponse(
            config=documents.model_config_proto(config if caller.admin else tenant_view(config))
        )

    @maps_errors
    async def ModelStatistics(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelStatisticsResponse:
        gw = self.gw
        stats = await gw.cluster_model_stats()  # every gateway's, added up (cluster_stats.py)
        configs = gw.configs()
        if request.name:
            _check_name(request.name)
            config = configs.get(request.name)
            if config is None and not gw.model_ready(request.name):
                raise errors.NotFound(f"model {request.name!r} not found", model=request.name)
            documents.check_version(config, request.name, request.version)
            names = [request.name]
        else:
            names = sorted(set(configs) | {m for m in stats.models() if gw.model_ready(m)})
        entries = [documents.statistics_entry(n, documents.model_version(configs.get(n)), stats.snapshot(n)) for n in names]
        return documents.statistics_proto(entries)

    # inference -------------------------------------------------------------------------------------
    @maps_errors
    async def ModelInfer(  # noqa: N802  (gRPC method names)
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        """The servicer method, for callers in process; the server registers `infer_raw` instead."""
        return await self._infer(request, context)

    async def infer_raw(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """ModelInfer as the server serves it: the request's bytes in, the answer's bytes out (no
        deserializer, serializer or guard frames around it); the request is decoded once, here."""
        try:
            try:
                request = service_pb2.ModelInferRequest.FromString(raw)
            except Exception:  # DecodeError, or nesting past the runtime's limit: INVALID_ARGUMENT (grpc_decode.py)
                raise grpc_decode.ERROR from None
            reply = await self._infer(request, context)
            return reply.SerializeToString()
        except errors.UnimodelError as exc:
            err = exc
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("gRPC method ModelInfer failed")
            err = errors.Internal("internal error")
        await context.abort(err.grpc_status, err.message, trailing_metadata=status_trailers(err))
        raise AssertionError("context.abort returned")  # pragma: no cover  (it raises AbortError)

    async def _infer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        gw = self.gw
        model = request.model_name
        config = gw.configs().get(model)
        documents.check_version(config, model, request.model_version)
        call = codec.parse_grpc_infer(request)
        metadata = context.invocation_metadata()
        caller = gw.auth.principal_from_metadata(metadata)
        codec.check_priority(call.item, caller)
        ctx = RequestContext.from_grpc(metadata, context.time_remaining(), gw.settings.request_timeout_s, tenant=caller.tenant)
        if call.timeout_s is not None:
            deadline = now_ms() + int(call.timeout_s * 1000)
            if deadline < ctx.deadline_ms:
                ctx = dataclasses.replace(ctx, deadline_ms=deadline)  # keeps the tenant and trace context
        await self.gather.hold()
        self.gather.waiting += 1
        try:
            reply = await gw.infer(model, call.item, ctx, API)
        finally:
            self.gather.waiting -= 1
        # Trailing metadata travels with the status: no extra send operation per call.
        context.set_trailing_metadata(reply_metadata(ctx))
        return codec.render_grpc_infer(reply, call, model, documents.model_version(config))

    # not offered -----------------------------------------------------------------------------------
    async def _unimplemented(self, what: str, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by the UniModel gateway")

    async def ModelStreamInfer(  # noqa: N802  (gRPC method names)
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> Any:
        await self._unimplemented("streaming inference (ModelStreamInfer)", context)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("the model repository extension", context)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("the model repository extension (register models with POST /v1/models)", context)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("the model repository extension", context)

    async def SystemSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("system shared memory", context)

    async def SystemSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("system shared memory", context)

    async def CudaSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("CUDA shared memory", context)

    async def CudaSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("CUDA shared memory", context)

    async def TraceSetting(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("trace settings", context)

    async def LogSettings(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802  (gRPC method names)
        await self._unimplemented("log settings", context)


INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"


class _RawInfer(grpc.GenericRpcHandler):
    """What the generated add_GRPCInferenceServiceServicer_to_server sees: `server`, with ModelInfer's handler
    swapped for one on bytes (`api.infer_raw`) on the way in, as a registered method and ahead of the
    generic handler."""

    def __init__(self, server: Any, api: KServeGrpcApi) -> None:
        self.server = server
        self.raw = grpc.unary_unary_rpc_method_handler(api.infer_raw)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.raw if handler_call_details.method == INFER_METHOD else None

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers((self, *handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service_name, {**method_handlers, "ModelInfer": self.raw})


def add_kserve_grpc(server: GrpcServer, gw: KServePorts) -> KServeGrpcApi:
    """Serve inference.GRPCInferenceService on the gateway's gRPC server (health and reflection list it);
    ModelInfer on bytes (KServeGrpcApi.infer_raw)."""
    api = KServeGrpcApi(gw)

    def add(servicer: KServeGrpcApi, grpc_server: Any) -> None:
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _RawInfer(grpc_server, servicer))

    server.add(add, api, SERVICE_NAME)
    return api
