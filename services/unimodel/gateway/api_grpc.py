"""gRPC InferenceService of the gateway (protocol translation only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from unimodel.core.context import RequestContext
from unimodel.core.grpc_server import maps_errors
from unimodel.v1 import inference_pb2, services_pb2_grpc

if TYPE_CHECKING:
    from unimodel.gateway.service import GatewayService


class InferenceApi(services_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gw: GatewayService) -> None:
        self.gw = gw

    @maps_errors
    async def Predict(  # noqa: N802
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        ctx = RequestContext.from_grpc(
            context.invocation_metadata(), context.time_remaining(), self.gw.settings.request_timeout_s
        )
        reply = await self.gw.predict(request.model, request.input, dict(request.parameters), ctx, api="grpc")
        # Trailing metadata travels with the status: no extra send operation per call.
        context.set_trailing_metadata((("x-request-id", ctx.request_id),))
        return reply

    @maps_errors
    async def ListModels(  # noqa: N802
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for entry in self.gw.models().values():
            out.models.add(name=entry.name, instances=entry.instances, ready=bool(entry.instances))
        return out
