"""UniModel's own REST API (protocol translation only): `POST /v1/models/{name}:predict` (served by the
fast path, documented and kept as a fallback here) and the model list `GET /v1/models`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from unimodel.core import errors, modelconfig
from unimodel.core.values import from_value, to_value
from unimodel.gateway import big_bodies, json_body
from unimodel.gateway.http_context import http_context, raw_id_headers
from unimodel.gateway.ports import UnifiedPorts
from unimodel.gateway.spool import SpooledBody
from unimodel.gateway.unified.errors import Headers, error_result

log = logging.getLogger(__name__)


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



async def run_predict(
    gw: UnifiedPorts, name: str, raw: bytes | SpooledBody, header: Callable[[str], str]
) -> tuple[int, big_bodies.Payload, Headers]:
    """The one implementation of POST /v1/models/{name}:predict: (status, JSON body, headers). Never raises.
    A big body may come in a file already (fast_path.py); a big answer comes as a view of one."""
    try:
        if isinstance(raw, SpooledBody) or gw.body_codec.takes(len(raw)):  # decoded and encoded off the event loop
            return await big_bodies.predict(gw, name, raw, header, parse_body)
        body = parse_body(raw)
        ctx = http_context(header, gw.settings.request_timeout_s)
        reply = await gw.predict(name, to_value(body.input), body.parameters, ctx)
    except errors.UnimodelError as err:
        return error_result(err)
    except Exception as exc:
        log.error("predict failed: %s", exc, exc_info=exc)
        return error_result(errors.Internal("internal error"))
    headers = [
        *raw_id_headers(ctx),
        (b"x-unimodel-worker", reply.worker_id.encode()),
        (b"x-unimodel-path", ",".join(reply.path).encode()),
    ]
    return 200, orjson.dumps({"model": reply.model, "output": from_value(reply.output)}), headers



def register_unified_routes(app: FastAPI, gw: UnifiedPorts) -> None:
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
        "/v1/models/{name}:predict",
        tags=["inference"],
        summary="Run one input through a model (batched with other requests)",
        response_model=PredictReply,
        responses={400: {}, 404: {}, 413: {}, 429: {}, 503: {}, 504: {}},
        openapi_extra=json_body.openapi_body(PredictBody),
    )
    async def predict(name: str, request: Request) -> Response:
        # Served by the fast path (fast_path.py) in front of this app; kept here so OpenAPI documents it (and as fallback).
        body = await request.body()
        status, payload, headers = await run_predict(gw, name, body, lambda k: request.headers.get(k, ""))
        return Response(payload, status, headers={k.decode(): v.decode() for k, v in headers}, media_type="application/json")
