"""KServe v2 / Open Inference Protocol gRPC surface of the gateway (protocol translation only).

Implements Triton's `inference.GRPCInferenceService` with the stubs generated in `tritonclient.grpc`, so
this server and any Triton client in the same process share one set of descriptors. Errors abort with
the status of our error tree and the message (tritonclient raises InferenceServerException with it),
plus our ErrorDetail in grpc-status-details-bin (core.grpc_server.maps_errors). Methods for features the
gateway does not have (repository control, shared memory, streaming, trace and log settings) answer
UNIMPLEMENTED. Which methods need an admin key: auth.GRPC_TENANT_METHODS (everything else is admin-only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from unimodel import __version__
from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext, now_ms
from unimodel.core.grpc_server import GrpcServer, maps_errors
from unimodel.gateway.config_views import tenant_view
from unimodel.gateway.kserve import codec, documents
from unimodel.gateway.ports import KServePorts
from unimodel.gateway.traces import reply_metadata

API = "kserve_grpc"  # the `api` label of the gateway's request metrics
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _check_name(model: str) -> None:
    if not model or not subjects.is_valid_model_name(model):
        raise errors.InvalidArgument(f"invalid model name {model!r}", field="model")


class KServeGrpcApi(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gw: KServePorts) -> None:
        self.gw = gw

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
        reply = await gw.infer(model, call.item, ctx, API)
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


def add_kserve_grpc(server: GrpcServer, gw: KServePorts) -> KServeGrpcApi:
    """Serve inference.GRPCInferenceService on the gateway's gRPC server (health and reflection list it)."""
    api = KServeGrpcApi(gw)
    server.add(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, api, SERVICE_NAME)
    return api
