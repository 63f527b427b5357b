"""ModelCache's routes: `POST /modelcache` (also served by the fast path) and the websocket."""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response

from unimodel.gateway import json_body
from unimodel.gateway.auth import principal_of
from unimodel.gateway.modelcache import protocol, serving
from unimodel.gateway.ports import ModelCachePorts


def register_modelcache_routes(app: FastAPI, gw: ModelCachePorts) -> None:
    @app.post(
        "/modelcache", tags=["cache"],
        summary="ModelCache-compatible cache API: insert, query, remove (body: JSON, or a JSON string of it)",
        responses={
            200: {"description": "ModelCache's response (errorCode 0 = success)"},
            400: {"description": "not a ModelCache request (errorCode 103); nothing was written"},
            503: {"description": "the cache (Milvus, the embedding model) is unavailable; nothing was written"},
        },
        openapi_extra=json_body.openapi_body(protocol.REQUEST_SCHEMA),
    )
    async def modelcache(request: Request) -> Response:
        raw = await request.body()
        status, result = await serving.handle(
            gw, raw, principal_of(request.scope).tenant, request.headers.get("x-request-id", ""),
            request.headers.get("traceparent", ""),
        )
        return Response(orjson.dumps(result), status, media_type="application/json")

    @app.websocket("/modelcache")
    async def modelcache_socket(ws: WebSocket) -> None:
        await serving.serve_socket(gw, ws)
