"""REST API of the gateway (protocol translation only): JSON <-> the gateway's calls."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unimodel import __version__
from unimodel.core import errors, modelconfig
from unimodel.core.context import RequestContext
from unimodel.core.values import from_value, to_value
from unimodel.gateway import catalog, json_body
from unimodel.gateway.auth import TENANT_HEADER
from unimodel.gateway.api_kserve_http import error_result as kserve_error_result
from unimodel.gateway.api_kserve_http import infer_asgi, match_infer

if TYPE_CHECKING:
    from unimodel.gateway.service import GatewayService


class PredictBody(BaseModel):
    input: Any = Field(..., description="model input: any JSON value (text, numbers, lists, objects)")
    parameters: dict[str, str] = Field(default_factory=dict, description="per-request engine parameters")


class PredictReply(BaseModel):
    model: str
    output: Any


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "unimodel"
    ready: bool
    state: str = Field(..., description="READY, LOADING, FAILED or UNAVAILABLE")
    instances: int = Field(..., description="worker instances that serve the model now")
    engine: str = Field(
        "",
        description=(
            "engine the model runs on (onnx, llamacpp, vllm, openai, delay, echo): a registered model's config, "
            "else what its workers report (built-ins such as echo); empty while no worker has said"
        ),
    )
    created: int = Field(0, description="Unix time the gateway first saw the model (OpenAI's field)")
    generative: bool = Field(False, description="a text-generation model: /v1/chat/completions and /v1/completions")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="model name; alone: the folder of that name in the model repository")
    path: str | None = Field(None, description="model folder inside the gateway's models root (403 outside it)")
    config: dict[str, Any] | None = Field(
        None, description="ModelConfig fields overriding the folder's config.yaml (e.g. replicas, max_batch_size)"
    )


class InstanceStatus(BaseModel):
    id: str
    state: str
    error: str = ""
    inflight: int = 0


class ModelStatusReply(BaseModel):
    name: str
    state: str = Field(..., description="READY, LOADING, FAILED or UNAVAILABLE")
    registered: bool
    instances: list[InstanceStatus]
    errors: list[str] = Field(default_factory=list)
    config: dict[str, Any] | None = None


def model_status(entry: catalog.ModelEntry) -> ModelStatusReply:
    return ModelStatusReply(
        name=entry.name,
        state=entry.state,
        registered=entry.registered,
        instances=[InstanceStatus(id=s.id, state=s.state, error=s.error, inflight=s.inflight) for s in entry.states],
        errors=entry.errors(),
        config=modelconfig.to_dict(entry.config) if entry.config is not None else None,
    )


class JsonResponse(Response):
    """JSON rendered by orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(err: errors.UnimodelError) -> Response:
    status, body, headers = _error_result(err)
    return Response(body, status, headers={k.decode(): v.decode() for k, v in headers}, media_type="application/json")


class BodyLimit:
    """Outermost ASGI layer: 413 for bodies over the limit, by Content-Length up front or, while the body
    streams in, by raising PayloadTooLarge from `receive` (the route's error handling answers it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = errors.PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                if scope["path"].startswith("/v2"):  # KServe clients expect {"error": "<message>"}
                    status, body, headers = kserve_error_result(too_large)
                    await Response(body, status, headers={k.decode(): v.decode() for k, v in headers},
                                   media_type="application/json")(scope, receive, send)
                else:
                    await error_response(too_large)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def parse_body(raw: bytes) -> PredictBody:
    """The :predict body (checked by hand, not by pydantic: this is the hot path)."""
    data = json_body.parse_object(raw, example=' like {"input": ...}')
    if "input" not in data:
        raise errors.InvalidArgument("input is required", field="input")
    params = data.get("parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise errors.InvalidArgument("parameters must be an object of strings", field="parameters")
    unknown = set(data) - {"input", "parameters"}
    if unknown:
        raise errors.InvalidArgument(f"unknown field(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    return PredictBody.model_construct(input=data["input"], parameters=params)


Headers = list[tuple[bytes, bytes]]


def _error_result(err: errors.UnimodelError) -> tuple[int, bytes, Headers]:
    headers: Headers = []
    if err.retry_after_s:
        headers.append((b"retry-after", str(max(1, round(err.retry_after_s))).encode()))
    return err.http_status, orjson.dumps(err.to_json()), headers


async def run_predict(
    gw: GatewayService, name: str, raw: bytes, header: Callable[[str], str]
) -> tuple[int, bytes, Headers]:
    """The one implementation of POST /v1/models/{name}:predict: (status, JSON body, headers). Never raises."""
    try:
        body = parse_body(raw)
        ctx = RequestContext.new(
            gw.settings.request_timeout_s,
            request_id=header("x-request-id"),
            traceparent=header("traceparent"),
            tracestate=header("tracestate"),
            tenant=header(TENANT_HEADER),
        )
        reply = await gw.predict(name, to_value(body.input), body.parameters, ctx)
    except errors.UnimodelError as err:
        return _error_result(err)
    except Exception as exc:
        gw.log.error("predict failed: %s", exc, exc_info=exc)
        return _error_result(errors.Internal("internal error"))
    headers = [
        (b"x-request-id", ctx.request_id.encode()),
        (b"x-unimodel-worker", reply.worker_id.encode()),
        (b"x-unimodel-path", ",".join(reply.path).encode()),
    ]
    return 200, orjson.dumps({"model": reply.model, "output": from_value(reply.output)}), headers


class FastRoutes:
    """Serves the hot routes (predict, KServe infer, POST /modelcache) straight from ASGI, in front of the
    FastAPI app.

    FastAPI's middleware stack cost about a quarter of the gateway's CPU per echo request (py-spy,
    docs/benchmarks.md); this layer calls the same handler (run_predict) and gives the same error bodies.
    Every other route, and the OpenAPI document, come from the FastAPI app behind it; BodyLimit wraps both.
    """

    PREDICT = re.compile(r"^/v1/models/([^/]+):predict$")

    def __init__(self, app: ASGIApp, gw: GatewayService) -> None:
        self.app, self.gw = app, gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = scope["type"] == "http" and scope["method"] == "POST"
        match = self.PREDICT.match(scope["path"]) if post else None
        if match is not None:
            name = match.group(1)
            await self._json_route(
                scope, receive, send, lambda raw, headers: run_predict(self.gw, name, raw, lambda k: headers.get(k, ""))
            )
            return
        if post and scope["path"] == "/modelcache":  # cache lookups are the millisecond path too
            await self._json_route(scope, receive, send, self._modelcache)
            return
        infer = match_infer(scope["path"]) if post else None
        if infer is not None:
            await infer_asgi(self.gw, infer[0], infer[1], scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _modelcache(self, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes, Headers]:
        from unimodel.gateway.api_modelcache import handle

        status, result = await handle(self.gw, raw, headers.get(TENANT_HEADER, ""), headers.get("x-request-id", ""))
        return status, orjson.dumps(result), []

    async def _json_route(
        self, scope: Scope, receive: Receive, send: Send,
        handler: Callable[[bytes, dict[str, str]], Awaitable[tuple[int, bytes, Headers]]],
    ) -> None:
        """Read the body, `handler(body, headers)` -> (status, JSON payload, extra headers), send the answer."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            raw = await self._body(receive)
        except errors.UnimodelError as err:  # PayloadTooLarge from BodyLimit, or the client left
            status, payload, extra = _error_result(err)
        else:
            status, payload, extra = await handler(raw, headers)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _body(receive: Receive) -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise errors.Cancelled("client disconnected")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def build_app(gw: GatewayService) -> FastAPI:
    app = FastAPI(
        title="UniModel gateway",
        version=__version__,
        description="One gateway for every kind of model. Errors are JSON: {\"error\": {\"code\", \"message\"}}.",
        default_response_class=JsonResponse,
    )

    @app.exception_handler(errors.UnimodelError)
    async def _unimodel_error(_request: Request, exc: errors.UnimodelError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        # query and path parameters only: no route takes a FastAPI body parameter (bodies: json_body)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(errors.InvalidArgument(f"{where}: {first.get('msg', 'invalid value')}", field=where))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JsonResponse:
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(exc.status_code, "INVALID_ARGUMENT")
        return JsonResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        gw.log.error("unhandled error: %s", exc, exc_info=exc)
        return error_response(errors.Internal("internal error"))

    @app.get("/health/live", tags=["health"], summary="The gateway process is up")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="200 once the cluster can serve (NATS, etcd, router, batcher, a model); 503 otherwise and while the gateway stops",
        responses={503: {"description": "not ready; the body lists the failing checks"}},
    )
    async def ready() -> JsonResponse:
        checks = gw.readiness()
        ok = all(checks.values())
        return JsonResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/v1/models", tags=["models"], summary="Registered and served models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=m.name, ready=bool(m.instances), state=m.state, instances=len(m.instances),
                    engine=m.engine,
                    generative=m.config is not None and modelconfig.is_generative(m.config),
                    created=gw.first_seen(m.name),
                )
                for m in gw.models().values()
            ]
        )

    @app.post(
        "/v1/models",
        tags=["models"],
        summary="Register a model (from the repository by name, or a folder inside the models root)",
        status_code=202,
        response_model=ModelStatusReply,
        responses={400: {}, 403: {"description": "path outside the models root"}, 404: {}, 503: {}},
        openapi_extra=json_body.openapi_body(RegisterBody),
    )
    async def register_model(request: Request) -> ModelStatusReply:
        body = json_body.parse_model(await request.body(), RegisterBody)
        config = await gw.register_model(body.model_dump(exclude_none=True))
        entry = gw.models().get(config.name) or catalog.ModelEntry(config.name, (), config)
        return model_status(entry)

    @app.get(
        "/v1/models/{name:path}/status",
        tags=["models"],
        summary="A model's state on every worker instance",
        response_model=ModelStatusReply,
        responses={404: {}},
    )
    async def get_model_status(name: str) -> ModelStatusReply:
        entry = gw.models().get(name)
        if entry is None:
            raise errors.NotFound(f"model {name!r} not found", model=name)
        return model_status(entry)

    @app.delete(
        "/v1/models/{name:path}",
        tags=["models"],
        summary="Unregister a model: workers unload it",
        response_model=ModelStatusReply,
        responses={404: {}, 503: {}},
    )
    async def unregister_model(name: str) -> ModelStatusReply:
        await gw.unregister_model(name)
        entry = gw.models().get(name) or catalog.ModelEntry(name, ())
        reply = model_status(entry)
        reply.state = "UNLOADING"
        return reply

    @app.post(
        "/v1/models/{name}:predict",
        tags=["inference"],
        summary="Run one input through a model (batched with other requests)",
        response_model=PredictReply,
        responses={400: {}, 404: {}, 413: {}, 429: {}, 503: {}, 504: {}},
        openapi_extra=json_body.openapi_body(PredictBody),
    )
    async def predict(name: str, request: Request) -> Response:
        # Served by FastRoutes in front of this app; kept here so OpenAPI documents it (and as fallback).
        body = await request.body()
        status, payload, headers = await run_predict(gw, name, body, lambda k: request.headers.get(k, ""))
        return Response(payload, status, headers={k.decode(): v.decode() for k, v in headers}, media_type="application/json")

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of the gateway")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
