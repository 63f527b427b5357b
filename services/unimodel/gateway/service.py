"""gateway runtime: HTTP (uvicorn) and gRPC servers, etcd view of the cluster, hand-off to the batcher."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import uvicorn
from google.protobuf import struct_pb2

from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import FatalError, Service
from unimodel.core.registry import Discovery, instances_prefix
from unimodel.gateway import catalog
from unimodel.gateway.api_grpc import InferenceApi
from unimodel.gateway.api_http import BodyLimit, FastRoutes, build_app
from unimodel.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from unimodel.gateway.settings import GatewaySettings
from unimodel.v1 import inference_pb2, registry_pb2, services_pb2, services_pb2_grpc


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our service: signals stay with the Service lifecycle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService(Service):
    kind = "gateway"
    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, **kw)
        self.instances: Discovery[registry_pb2.InstanceInfo] = Discovery(
            self.store, instances_prefix(settings.etcd_prefix), registry_pb2.InstanceInfo.FromString,
            on_change=self._on_instance_change,
        )
        self._models: dict[str, catalog.ModelEntry] = {}
        self.stats = GatewayMetrics(self.metrics.registry)
        self.api = build_app(self)  # FastAPI: every route, OpenAPI
        # What uvicorn serves: the body limit, then the hot route, then FastAPI for the rest.
        self.app = BodyLimit(FastRoutes(self.api, self), settings.max_body_bytes)
        self.http_port = 0
        self._http: _EmbeddedServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.grpc.add(
            services_pb2_grpc.add_InferenceServiceServicer_to_server,
            InferenceApi(self),
            services_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
        )

    # cluster view ------------------------------------------------------------------------------
    def _on_instance_change(self, key: str, old: object, new: object) -> None:
        self._models = catalog.models(self.instances.items)

    def models(self) -> dict[str, catalog.ModelEntry]:
        """Models served now (recomputed on every etcd change, not per request)."""
        return self._models

    def readiness(self) -> dict[str, bool]:
        return catalog.readiness(self.instances.items, self.bus.connected, self.instances.synced.is_set())

    # the request path -----------------------------------------------------------------------------
    async def predict(
        self, model: str, value: struct_pb2.Value, parameters: dict[str, str], ctx: RequestContext, api: str = "http"
    ) -> inference_pb2.PredictResponse:
        """Hand one request to the batcher and wait for its worker's answer; records metrics."""
        started = time.perf_counter()
        code = "OK"
        try:
            return await self._predict(model, value, parameters, ctx)
        except errors.UnimodelError as exc:
            code = exc.code_name
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            label = model if model in self.models() else UNKNOWN_MODEL
            self.stats.observe(api, label, code, time.perf_counter() - started)

    async def _predict(
        self, model: str, value: struct_pb2.Value, parameters: dict[str, str], ctx: RequestContext
    ) -> inference_pb2.PredictResponse:
        if not model or not subjects.is_valid_model_name(model):
            raise errors.InvalidArgument(f"invalid model name {model!r}", field="model")
        if self.instances.synced.is_set() and model not in self.models():
            raise errors.NotFound(f"model {model!r} not found", model=model)
        request = inference_pb2.PredictRequest(model=model, input=value, parameters=parameters)
        raw = await self.bus.request(
            subjects.batch(model), request.SerializeToString(), ctx, timeout_s=self.settings.request_timeout_s
        )
        reply = inference_pb2.PredictResponse.FromString(raw)
        reply.path.insert(0, self.id)
        return reply

    # lifecycle --------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.instances.start()
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.http_port))
        except OSError as exc:
            sock.close()
            raise FatalError(f"cannot serve HTTP on {self.settings.host}:{self.settings.http_port}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", http="httptools", loop="none",
            timeout_graceful_shutdown=int(self.settings.drain_timeout_s),
        )
        self._http = _EmbeddedServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise FatalError("HTTP server failed to start")
            await asyncio.sleep(0.01)
        self.log.info("HTTP on %s:%d, gRPC on %s:%d", self.settings.host, self.http_port, self.settings.host, self.grpc.port)

    async def on_drain(self, timeout_s: float) -> None:
        # Stop accepting HTTP connections and let in-flight HTTP requests finish (uvicorn waits for them).
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._http_task), timeout_s)
            except TimeoutError:
                self._http.force_exit = True
                await asyncio.gather(self._http_task, return_exceptions=True)

    async def on_close(self) -> None:
        await self.instances.stop()
