"""KServe v2 / Open Inference Protocol REST surface of the gateway (protocol translation only).

Compatible with Triton's clients (`tritonclient.http`, perf_analyzer): error bodies are {"error": "<message>"}
on every /v2 route (tritonclient raises InferenceServerException with that message), with the status of
our error tree (400 bad input, 404 unknown model, 413, 429 / 503 with Retry-After, 504).

* `register_kserve_routes(app, gw)` adds the documented FastAPI routes (health, metadata, config,
  statistics, and infer as a fallback so OpenAPI shows it).
* `infer_asgi(gw, model, version, scope, receive, send)` serves POST /v2/models/{m}[/versions/{v}]/infer
  straight from ASGI, without FastAPI (the gateway's fast path calls it; `match_infer(path)` finds it).
Both infer entries share `run_infer`; the translation itself is in codec.py, the documents in documents.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from unimodel import __version__
from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext
from unimodel.core.modelconfig import DATATYPES
from unimodel.gateway import json_body
from unimodel.gateway.auth import ANONYMOUS, TENANT_HEADER, Principal, principal_of
from unimodel.gateway.big_bodies import Payload
from unimodel.gateway.config_views import tenant_view
from unimodel.gateway.http_context import http_context, raw_id_headers, read_body_spooled, send_answer
from unimodel.gateway.kserve import big_infer, codec, documents
from unimodel.gateway.kserve.errors import JSON, Headers, error_response, error_result, response
from unimodel.gateway.ports import KServePorts
from unimodel.gateway.spool import SpooledBody
from unimodel.gateway.statistics import StatsView
from unimodel.v1 import inference_pb2, model_pb2

log = logging.getLogger(__name__)
API = "kserve_http"  # the `api` label of the gateway's request metrics
INFER_PATH = re.compile(r"^/v2/models/(?P<model>.+?)(?:/versions/(?P<version>[^/]+))?/infer$")
HEADER_LENGTH = "inference-header-content-length"
_OCTETS = b"application/octet-stream"
_WANTED = frozenset(
    {HEADER_LENGTH, "content-encoding", "content-length", "x-request-id", "traceparent", "tracestate", TENANT_HEADER}
)


def match_infer(path: str) -> tuple[str, str] | None:
    """(model, version) of an infer path, version "" when none is given; None for any other path."""
    match = INFER_PATH.match(path)
    if match is None:
        return None
    return match.group("model"), match.group("version") or ""


def _json(status: int, doc: Any) -> Response:
    return response(status, orjson.dumps(doc))


def _check_name(model: str) -> None:
    if not model or not subjects.is_valid_model_name(model):
        raise errors.InvalidArgument(f"invalid model name {model!r}", field="model")


# infer --------------------------------------------------------------------------------------------


def _header_length(value: str) -> int | None:
    if not value:
        return None
    if not value.strip().isdigit():
        raise errors.InvalidArgument(
            f"Inference-Header-Content-Length must be a number of bytes, got {value!r}", field="Inference-Header-Content-Length"
        )
    return int(value)


async def run_infer(
    gw: KServePorts, model: str, version: str, raw: bytes | SpooledBody, header: Callable[[str], str],
    caller: Principal = ANONYMOUS,
) -> tuple[int, Payload, Headers]:
    """POST /v2/models/{model}[/versions/{version}]/infer: (status, body, headers). Never raises.
    `header(name)` reads a request header by lower-case name ("" when absent). A body in a file (a big one,
    infer_asgi spools it) is parsed and answered in the helper processes (big_infer.py) and closed here."""
    try:
        config = gw.configs().get(model)
        documents.check_version(config, model, version)
        header_length = _header_length(header(HEADER_LENGTH))
        if isinstance(raw, SpooledBody):

            def check_call(call: codec.InferCall) -> float:
                codec.check_priority(call.item, caller)
                return _timeout(gw, call)

            rendered, ctx = await big_infer.infer(
                gw, model, documents.model_version(config), config, raw, header, header_length, check_call,
                lambda timeout_s: http_context(header, timeout_s),
            )
            payload, header_length, worker, path = rendered.payload, rendered.header_length, rendered.worker, rendered.path
        else:
            payload, header_length, worker, path, ctx = await _infer_in_memory(gw, model, config, raw, header, header_length, caller)
    except errors.UnimodelError as err:
        return error_result(err)
    except Exception as exc:
        log.error("KServe infer failed: %s", exc, exc_info=exc)
        return error_result(errors.Internal("internal error"))
    finally:
        if isinstance(raw, SpooledBody):
            raw.close()
    headers: Headers = [*raw_id_headers(ctx), (b"x-unimodel-worker", worker.encode()), (b"x-unimodel-path", path.encode())]
    if header_length is None:
        headers.append((b"content-type", JSON))
    else:
        headers.append((b"content-type", _OCTETS))
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    return 200, payload, headers


def _timeout(gw: KServePorts, call: codec.InferCall) -> float:
    timeout_s = gw.settings.request_timeout_s
    return timeout_s if call.timeout_s is None else min(timeout_s, call.timeout_s)


async def _infer_in_memory(
    gw: KServePorts, model: str, config: model_pb2.ModelConfig | None, raw: bytes, header: Callable[[str], str],
    header_length: int | None, caller: Principal,
) -> tuple[bytes, int | None, str, str, RequestContext]:
    """run_infer of a body in memory: (payload, header length, worker, path, context)."""
    body = codec.decode_body(raw, header("content-encoding"), gw.settings.max_body_bytes)
    offload = gw.body_codec  # big bodies are decoded and encoded off the event loop (big_bodies.py)
    if offload.takes(len(body)):
        call = await offload.run(codec.parse_rest_infer, body, header_length)
    else:
        call = codec.parse_rest_infer(body, header_length)
    codec.check_priority(call.item, caller)
    ctx = http_context(header, _timeout(gw, call))
    reply = await gw.infer(model, call.item, ctx, API)
    if offload.takes(reply.ByteSize()):  # the request's tensors stay here: the rendering needs none of them
        lean = dataclasses.replace(call, item=inference_pb2.BatchItem())
        payload, out_length = await offload.run(codec.render_rest_infer, reply, lean, model, documents.model_version(config))
    else:
        payload, out_length = codec.render_rest_infer(reply, call, model, documents.model_version(config))
    return payload, out_length, reply.worker_id, ",".join(reply.path), ctx


async def infer_asgi(gw: KServePorts, model: str, version: str, scope: Scope, receive: Receive, send: Send) -> None:
    """The lean infer route: ASGI in, ASGI out, no FastAPI. A body big enough for the helper processes goes
    into a file as it arrives and is read, like its answer, paced (pacing.py)."""
    wanted: dict[str, str] = {}
    for key, value in scope["headers"]:
        name = key.decode("latin-1").lower()
        if name in _WANTED:
            wanted[name] = value.decode("latin-1")
    rate = gw.settings.big_transfer_bytes_per_s
    raw: bytes | SpooledBody
    payload: Payload
    try:
        length = wanted.get("content-length", "")
        raw = await read_body_spooled(receive, gw.body_codec.spool_from, int(length) if length.isdigit() else 0, rate)
    except errors.UnimodelError as err:  # PayloadTooLarge from the body limit, or the client left
        status, payload, headers = error_result(err)
    else:
        status, payload, headers = await run_infer(gw, model, version, raw, lambda k: wanted.get(k, ""), principal_of(scope))
    if status != 200:  # error results carry no content type; answers set their own
        headers.append((b"content-type", JSON))
    await send_answer(send, status, headers, payload, rate)


# documents for OpenAPI ------------------------------------------------------------------------------


class KServeError(BaseModel):
    error: str = Field(..., description="what went wrong (names the tensor or field at fault)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(..., description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES")
    shape: list[int] = Field(..., description="-1 marks a dimension of any size (the batch dimension first)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for a binary output')
    data: list[Any] | None = Field(None, description="row-major values (JSON outputs)")


class InferReply(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str | None = None
    model_name: str
    model_version: str
    outputs: list[OutputTensor]


class ModelStatistics(BaseModel):
    model_stats: list[dict[str, Any]] = Field(
        ..., description="Triton's statistics per model: inference_count, execution_count, inference_stats, ..."
    )


_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": sorted(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "items": {}, "description": "values, flat or nested, row-major"},
        "parameters": {
            "type": "object",
            "description": 'binary tensor extension: {"binary_data_size": n}, the size of its bytes after the JSON header',
        },
    },
}
_INFER_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the answer"},
        "parameters": {
            "type": "object",
            "description": "priority (1 = highest), timeout (microseconds), binary_data_output (bool); others go to the engine",
        },
        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "description": '{"binary_data": true} for a binary output'},
                },
            },
        },
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": KServeError, "description": text}
    for code, text in ((400, "bad request"), (404, "unknown model or version"), (503, "not ready; see Retry-After"))
}
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": KServeError, "description": "parameter 'priority' without an admin key or a key allowed priority"},
    413: {"model": KServeError, "description": "body too large"},
    429: {"model": KServeError, "description": "queue full, the tenant's queue share, or the key's rate limit; see Retry-After"},
    504: {"model": KServeError, "description": "deadline exceeded"},
}


# routes ---------------------------------------------------------------------------------------------


def _model_entries(gw: KServePorts, stats: StatsView, model: str, version: str) -> list[dict[str, Any]]:
    """Triton's statistics entries of `model` (every model: "") from `stats` (the cluster's)."""
    configs = gw.configs()
    if model:
        _check_name(model)
        config = configs.get(model)
        if config is None and not gw.model_ready(model):
            raise errors.NotFound(f"model {model!r} not found", model=model)
        documents.check_version(config, model, version)
        names = [model]
    else:
        names = sorted(set(configs) | {m for m in stats.models() if gw.model_ready(m)})
    return [documents.statistics_entry(name, documents.model_version(configs.get(name)), stats.snapshot(name)) for name in names]


def _metadata(gw: KServePorts, model: str, version: str) -> dict[str, Any]:
    _check_name(model)
    config = gw.configs().get(model)
    if config is None and not gw.model_ready(model):
        raise errors.NotFound(f"model {model!r} not found", model=model)
    documents.check_version(config, model, version)
    return documents.model_metadata(model, config)


def _config(gw: KServePorts, model: str, version: str, caller: Principal) -> dict[str, Any]:
    """The model's Triton config: in full for an admin, without file names and options for a tenant."""
    _check_name(model)
    config = gw.configs().get(model)
    if config is None:
        if gw.model_ready(model):
            raise errors.NotFound(f"model {model!r} is built into its worker and has no configuration", model=model)
        raise errors.NotFound(f"model {model!r} not found", model=model)
    documents.check_version(config, model, version)
    return documents.model_config(config if caller.admin else tenant_view(config))


def _model_ready(gw: KServePorts, model: str, version: str) -> tuple[int, dict[str, Any]]:
    """200 when an instance serves the model; 400 while it is registered but not served (the KServe
    spec's 4xx for "not ready", as Triton answers); 404 for an unknown model or version."""
    _check_name(model)
    config = gw.configs().get(model)
    ready = gw.model_ready(model)
    if config is None and not ready:
        raise errors.NotFound(f"model {model!r} not found", model=model)
    documents.check_version(config, model, version)
    return (200 if ready else 400), {"name": model, "ready": ready}


def register_kserve_routes(app: FastAPI, gw: KServePorts) -> None:
    """Add the KServe v2 routes to the gateway's FastAPI app (documented in its OpenAPI)."""
    tags: list[str | Enum] = ["kserve v2"]

    def guarded(fn: Callable[[], Response]) -> Response:
        try:
            return fn()
        except errors.UnimodelError as err:
            return error_response(err)

    @app.get("/v2", tags=tags, summary="Server metadata: name, version, protocol extensions", response_model=ServerMetadata)
    async def kserve_server_metadata() -> Response:
        return _json(200, documents.server_metadata(__version__))

    @app.get("/v2/health/live", tags=tags, summary="200 while the gateway process is up", response_model=Live)
    async def kserve_live() -> Response:
        return _json(200, {"live": True})

    @app.get(
        "/v2/health/ready",
        tags=tags,
        summary="200 when the cluster can serve, 400 otherwise (KServe: 4xx means not ready)",
        response_model=Ready,
        responses={400: {"model": Ready, "description": "not ready"}},
    )
    async def kserve_ready() -> Response:
        ready = all(gw.readiness().values())
        return _json(200 if ready else 400, {"ready": ready})

    @app.get(
        "/v2/models/stats",
        tags=tags,
        summary="Statistics of every model (Triton's format)",
        response_model=ModelStatistics,
        responses=_ERRORS,
    )
    async def kserve_all_stats() -> Response:
        stats = await gw.cluster_model_stats()
        return guarded(lambda: _json(200, documents.statistics_document(_model_entries(gw, stats, "", ""))))

    def per_model(
        suffix: str, name: str, summary: str, build: Callable[[str, str, Principal], Response], **kw: Any
    ) -> None:
        """The route with /versions/{version} and without it (versioned first: {model:path} is greedy);
        `build(model, version, caller)`."""

        async def versioned(request: Request, model: str, version: str) -> Response:
            return guarded(lambda: build(model, version, principal_of(request.scope)))

        async def latest(request: Request, model: str) -> Response:
            return guarded(lambda: build(model, "", principal_of(request.scope)))

        for path, endpoint, label in (
            (f"/v2/models/{{model:path}}/versions/{{version}}{suffix}", versioned, f"{name}_version"),
            (f"/v2/models/{{model:path}}{suffix}", latest, name),
        ):
            app.add_api_route(path, endpoint, methods=["GET"], name=label, summary=summary, tags=tags, **kw)

    async def model_stats(request: Request, model: str, version: str = "") -> Response:
        stats = await gw.cluster_model_stats()
        return guarded(lambda: _json(200, documents.statistics_document(_model_entries(gw, stats, model, version))))

    for path, label in (("/v2/models/{model:path}/versions/{version}/stats", "kserve_model_stats_version"),
                        ("/v2/models/{model:path}/stats", "kserve_model_stats")):  # versioned first: {model:path} is greedy
        app.add_api_route(
            path, model_stats, methods=["GET"], name=label, summary="Statistics of one model (Triton's format)", tags=tags,
            response_model=ModelStatistics, responses=_ERRORS,
        )
    per_model(
        "/ready", "kserve_model_ready", "200 when the model is served, 400 while it loads, 404 when unknown",
        lambda m, v, _caller: _json(*_model_ready(gw, m, v)),
        response_model=ModelReady, responses=_ERRORS,
    )
    per_model(
        "/config", "kserve_model_config", "Triton model configuration (model_config.proto as JSON)",
        lambda m, v, caller: _json(200, _config(gw, m, v, caller)),
        response_model=dict[str, Any], responses=_ERRORS,
    )

    infer_doc: dict[str, Any] = {
        "tags": tags,
        "summary": "Run tensors through a model (batched with other requests)",
        "description": (
            "JSON tensors, or Triton's binary tensor extension: the JSON header (its length in the "
            "Inference-Header-Content-Length header) followed by each binary input's bytes in input order. "
            "Outputs with binary_data come back the same way (Content-Type application/octet-stream)."
        ),
        "response_model": InferReply,
        "responses": _INFER_ERRORS,
        "openapi_extra": json_body.openapi_body(
            _INFER_SCHEMA, {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        ),
    }

    async def infer_route(request: Request, model: str, version: str) -> Response:
        # Served by the gateway's fast path (infer_asgi) in front of FastAPI; kept for OpenAPI and as fallback.
        try:
            raw = await request.body()
        except errors.UnimodelError as err:
            return error_response(err)
        status, payload, headers = await run_infer(
            gw, model, version, raw, lambda k: request.headers.get(k, ""), principal_of(request.scope)
        )
        content_type = next((v for k, v in headers if k == b"content-type"), JSON)
        body = payload if isinstance(payload, bytes) else bytes(payload)  # a body in memory is answered in memory
        return response(status, body, [(k, v) for k, v in headers if k != b"content-type"], content_type)

    async def infer_versioned(request: Request, model: str, version: str) -> Response:
        return await infer_route(request, model, version)

    async def infer_latest(request: Request, model: str) -> Response:
        return await infer_route(request, model, "")

    app.add_api_route(
        "/v2/models/{model:path}/versions/{version}/infer", infer_versioned, methods=["POST"], name="kserve_infer_version",
        **infer_doc,
    )
    app.add_api_route("/v2/models/{model:path}/infer", infer_latest, methods=["POST"], name="kserve_infer", **infer_doc)

    per_model(
        "", "kserve_model_metadata", "Model metadata: versions, platform, input and output tensors",
        lambda m, v, _caller: _json(200, _metadata(gw, m, v)),
        response_model=ModelMetadata, responses=_ERRORS,
    )
