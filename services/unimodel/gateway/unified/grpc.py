"""UniModel's gRPC InferenceService on the gateway (protocol translation only): Predict, Generate
(server-streaming), GenerateUnary, ListModels."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.core.grpc_server import maps_errors, status_trailers
from unimodel.core.values import check_depth
from unimodel.gateway import rate_limits
from unimodel.gateway.generation_stream import Generation
from unimodel.gateway.ports import UnifiedPorts
from unimodel.gateway.traces import reply_metadata
from unimodel.v1 import generate_pb2, inference_pb2, services_pb2_grpc


class InferenceApi(services_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gw: UnifiedPorts) -> None:
        self.gw = gw

    def _context(self, context: grpc.aio.ServicerContext, timeout_s: float) -> RequestContext:
        metadata = context.invocation_metadata()
        tenant = self.gw.auth.tenant_from_metadata(metadata)
        return RequestContext.from_grpc(metadata, context.time_remaining(), timeout_s, tenant=tenant)

    async def _start(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[RequestContext, Generation]:
        ctx = self._context(context, self.gw.settings.generate_timeout_s)
        if not request.session:
            for key, value in context.invocation_metadata() or ():
                if key.lower() == "x-session-id":
                    request.session = value if isinstance(value, str) else value.decode()
        request.id = ""  # the gateway's request id names the generation
        gen = await self.gw.generate(request, ctx, api="grpc", tenant=ctx.tenant)
        return ctx, gen

    def _debit(self, context: grpc.aio.ServicerContext, gen: Generation) -> None:
        """The tokens a generation used, against its key's tokens-per-minute limit (rate_limits.py)."""
        limiter = self.gw.rate_limiter
        if limiter.enabled:
            limits = limiter.limits_of(self.gw.auth.principal_from_metadata(context.invocation_metadata()))
            if limits is not None:
                limits.debit(rate_limits.tokens_used(gen.usage, gen.answer_tokens))

    async def Generate(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateChunk]:
        """Server-streaming generation: seq 0 (accepted, with the path), then the chunks. A cancelled
        call closes the generation, which aborts it on the worker."""
        try:
            ctx, gen = await self._start(request, context)
        except errors.UnimodelError as err:
            await context.abort(err.grpc_status, err.message, trailing_metadata=status_trailers(err))
            return
        await context.send_initial_metadata(reply_metadata(ctx))
        try:
            first = generate_pb2.GenerateChunk()
            first.CopyFrom(gen.first)
            first.path.insert(0, self.gw.id)
            yield first
            try:
                async for chunk in gen:
                    yield chunk
            except errors.UnimodelError as err:
                await context.abort(err.grpc_status, err.message, trailing_metadata=status_trailers(err))
        finally:
            await gen.close("the gRPC call ended")
            self._debit(context, gen)

    @maps_errors
    async def GenerateUnary(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        ctx, gen = await self._start(request, context)
        try:
            text = await gen.text()
        finally:
            await gen.close("the gRPC call ended")
            self._debit(context, gen)
        context.set_trailing_metadata(reply_metadata(ctx))
        return generate_pb2.GenerateResponse(
            id=ctx.request_id, model=request.model, text=text, finish_reason=gen.finish_reason, usage=gen.usage,
            worker_id=gen.first.worker_id, path=[self.gw.id, *gen.first.path],
        )

    @maps_errors
    async def Predict(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        check_depth(request.input)  # what the HTTP routes' to_value checks: every hop must decode it
        ctx = self._context(context, self.gw.settings.request_timeout_s)
        reply = await self.gw.predict(request.model, request.input, dict(request.parameters), ctx, api="grpc")
        # Trailing metadata travels with the status: no extra send operation per call.
        context.set_trailing_metadata(reply_metadata(ctx))
        return reply

    @maps_errors
    async def ListModels(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for entry in self.gw.models().values():
            out.models.add(name=entry.name, instances=entry.instances, ready=bool(entry.instances))
        return out
