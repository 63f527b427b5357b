"""ModelCache's API on the gateway (protocol translation only): `POST /modelcache` and the websocket
`/modelcache`, with ModelCache's request and response JSON, over the cache service.

Requests (ModelCache clients send the body as a JSON-encoded string, `requests.post(json=json.dumps(d))`;
both that and a plain JSON object are accepted):
    {"type": "insert", "scope": {"model": m}, "chat_info": [{"query": [{"role", "content"}, ...], "answer": a}, ...]}
    {"type": "query",  "scope": {"model": m}, "query": [{"role", "content"}, ...]}
    {"type": "remove", "scope": {"model": m}, "remove_type": "truncate_by_model" | "delete_by_id", "id_list": [..]}
    {"type": "register", "scope": {"model": m}}   (scopes need no registration: always succeeds)
A `query` may also be a plain string (one user message). The scope is the model plus, when the gateway
has API keys, the caller's tenant: entries are never shared across tenants.

Responses carry ModelCache's fields (errorCode 0 = success; `cacheHit`, `delta_time`, `hit_query`,
`answer`; `writeStatus`), plus `similarity`, `exact` and `entry_id` on hits, `timing` (embed_ms,
search_ms, cache_ms) on queries and `ids` on inserts. Errors
use ModelCache's codes (103 bad request, 202 query failed, 301/303 insert failed, 402 remove failed) with
an HTTP status saying the same (400, 503), never a 500.

Websocket: each text frame is {"requestId": id, "payload": <a request as above>}; each reply is
{"requestId": id, "result": <the response>}, in the order requests finish. A malformed frame gets
{"requestId": id or null, "result": {"errorCode": 400, ...}} and the connection stays open.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from starlette.websockets import WebSocketDisconnect

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.gateway import json_body
from unimodel.gateway.auth import TENANT_HEADER
from unimodel.v1 import cache_pb2, generate_pb2

if TYPE_CHECKING:
    from unimodel.gateway.service import GatewayService

TYPES = ("query", "insert", "remove", "register")
BAD_REQUEST, QUERY_FAILED, INSERT_FAILED, INSERT_ERROR, REMOVE_FAILED = 103, 202, 301, 303, 402
WS_BAD_FRAME = 400
MAX_FRAME_BYTES = 16 * 1024 * 1024


class BadRequest(Exception):
    """The request is not a ModelCache request; the message says what is wrong."""


def parse(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json_body.parse(raw)
        if isinstance(data, str):  # json=json.dumps(data): a JSON string holding the JSON request
            data = json_body.parse(data, "the JSON string in the body")
    except errors.InvalidArgument as exc:
        raise BadRequest(exc.message) from None
    if not isinstance(data, dict):
        raise BadRequest("the request must be a JSON object (or a JSON string holding one)")
    kind = data.get("type")
    if kind not in TYPES:
        raise BadRequest(f"type exception, should be one of {list(TYPES)}, got {kind!r}")
    scope = data.get("scope")
    if not isinstance(scope, dict) or not isinstance(scope.get("model"), str) or not scope["model"]:
        raise BadRequest("scope is required: {\"model\": \"<name>\"}")
    return data


def _messages(value: Any, where: str) -> list[generate_pb2.ChatMessage]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRequest(f"{where} is empty")
        return [generate_pb2.ChatMessage(role="user", content=value)]
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where} must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"{where}[{i}] must be an object with a role and a content")
        content = m.get("content", "")
        if not isinstance(content, str):
            raise BadRequest(f"{where}[{i}].content must be a string")
        out.append(generate_pb2.ChatMessage(role=m["role"], content=content))
    return out


def cache_scope(data: dict[str, Any], tenant: str) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(model=data["scope"]["model"], tenant=tenant)


def query_request(data: dict[str, Any], tenant: str) -> cache_pb2.CacheQueryRequest:
    if "query" not in data:
        raise BadRequest("query is required")
    return cache_pb2.CacheQueryRequest(scope=cache_scope(data, tenant), messages=_messages(data["query"], "query"))


def insert_request(data: dict[str, Any], tenant: str) -> cache_pb2.CacheInsertRequest:
    chat_info = data.get("chat_info")
    if isinstance(chat_info, dict):
        chat_info = [chat_info]
    if not isinstance(chat_info, list) or not chat_info:
        raise BadRequest("chat_info must be a non-empty list of {\"query\", \"answer\"}")
    request = cache_pb2.CacheInsertRequest(scope=cache_scope(data, tenant))
    for i, entry in enumerate(chat_info):
        if not isinstance(entry, dict):
            raise BadRequest(f"chat_info[{i}] must be an object with query and answer")
        answer = entry.get("answer")
        if not isinstance(answer, str):
            raise BadRequest(f"chat_info[{i}].answer must be a string")
        request.entries.add(messages=_messages(entry.get("query"), f"chat_info[{i}].query"), answer=answer)
    return request


def remove_request(data: dict[str, Any], tenant: str) -> cache_pb2.CacheRemoveRequest:
    kind = data.get("remove_type")
    request = cache_pb2.CacheRemoveRequest(scope=cache_scope(data, tenant))
    if kind == "truncate_by_model":
        request.truncate = True
    elif kind == "delete_by_id":
        ids = data.get("id_list")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest("id_list must be a non-empty list of entry ids (integers)")
        request.ids.extend(ids)
    else:
        raise BadRequest(f"remove_type must be 'truncate_by_model' or 'delete_by_id', got {kind!r}")
    return request


def _delta(started: float) -> str:
    return f"{time.perf_counter() - started:.4f}s"


def _query_error(code: int, desc: str) -> dict[str, Any]:
    return {"errorCode": code, "errorDesc": desc, "cacheHit": False, "delta_time": 0, "hit_query": "", "answer": ""}


async def handle(gw: GatewayService, raw: bytes | str, tenant: str, request_id: str = "") -> tuple[int, dict[str, Any]]:
    """One ModelCache request: (HTTP status, ModelCache response). Never raises."""
    started = time.perf_counter()
    try:
        data = parse(raw)
    except BadRequest as exc:
        return 400, _query_error(BAD_REQUEST, str(exc))
    kind = data["type"]
    ctx = RequestContext.new(gw.settings.request_timeout_s, request_id=request_id, tenant=tenant)
    try:
        if kind == "query":
            reply = await gw.cache.query(query_request(data, tenant), ctx)
            result: dict[str, Any] = {
                "errorCode": 0, "errorDesc": "", "cacheHit": reply.hit, "delta_time": _delta(started),
                "hit_query": reply.hit_query if reply.hit else "", "answer": reply.answer if reply.hit else "",
            }
            if reply.hit:
                result.update(similarity=round(float(reply.similarity), 6), exact=reply.exact, entry_id=reply.entry_id)
            # where the time went inside the cache service (milliseconds): query embedding, vector search, all
            result["timing"] = {
                "embed_ms": round(reply.embed_ns / 1e6, 3), "search_ms": round(reply.search_ns / 1e6, 3),
                "cache_ms": round(reply.total_ns / 1e6, 3),
            }
            gw.stats.cache(data["scope"]["model"] if data["scope"]["model"] in gw.models() else "", "hit" if reply.hit else "miss")
            return 200, result
        if kind == "insert":
            reply = await gw.cache.insert(insert_request(data, tenant), ctx)
            return 200, {"errorCode": 0, "errorDesc": "", "writeStatus": "success", "ids": list(reply.ids)}
        if kind == "remove":
            reply = await gw.cache.remove(remove_request(data, tenant), ctx)
            return 200, {
                "errorCode": 0, "errorDesc": "", "response": {"status": "success", "removed": reply.removed},
                "writeStatus": "success",
            }
        return 200, {"errorCode": 0, "errorDesc": "", "response": "create_success", "writeStatus": "success"}
    except BadRequest as exc:
        return 400, _failure(kind, BAD_REQUEST, str(exc))
    except errors.UnimodelError as exc:
        status = exc.http_status if exc.http_status < 500 else 503
        code = {"query": QUERY_FAILED, "insert": INSERT_FAILED if status < 500 else INSERT_ERROR}.get(kind, REMOVE_FAILED)
        if status == 400:
            code = BAD_REQUEST
        return status, _failure(kind, code, exc.message)
    except Exception as exc:  # a bug: still a ModelCache answer, not a traceback
        gw.log.error("modelcache %s failed: %s", kind, exc, exc_info=exc)
        return 503, _failure(kind, {"query": QUERY_FAILED, "insert": INSERT_ERROR}.get(kind, REMOVE_FAILED), "internal error")


def _failure(kind: str, code: int, desc: str) -> dict[str, Any]:
    if kind == "query":
        return _query_error(code, desc)
    if kind == "remove":
        return {"errorCode": code, "errorDesc": desc, "response": None, "removeStatus": "exception", "writeStatus": "exception"}
    return {"errorCode": code, "errorDesc": desc, "writeStatus": "exception"}


async def _serve_socket(gw: GatewayService, ws: WebSocket) -> None:
    tenant = ws.headers.get(TENANT_HEADER, "")
    await ws.accept()
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def reply(request_id: Any, result: dict[str, Any]) -> None:
        async with send_lock:
            await ws.send_text(orjson.dumps({"requestId": request_id, "result": result}).decode())

    async def one(request_id: Any, payload: Any) -> None:
        raw = payload if isinstance(payload, str) else orjson.dumps(payload)
        _status, result = await handle(gw, raw, tenant)
        try:
            await reply(request_id, result)
        except (WebSocketDisconnect, RuntimeError):
            pass

    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", "replace")
            request_id: Any = None
            try:
                if text is None or len(text) > MAX_FRAME_BYTES:
                    raise BadRequest("a frame must be JSON text of at most 16 MiB")
                frame = json_body.parse(text, "the frame")
                if not isinstance(frame, dict):
                    raise BadRequest("a frame must be {\"requestId\": ..., \"payload\": {...}}")
                request_id = frame.get("requestId")
                payload = frame.get("payload")
                if request_id in (None, "") or not payload:
                    raise BadRequest("a frame needs a requestId and a payload")
            except (errors.InvalidArgument, BadRequest) as exc:
                await reply(request_id, _query_error(WS_BAD_FRAME, f"bad request: {exc}"))
                continue
            task = asyncio.create_task(one(request_id, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except WebSocketDisconnect:
        pass
    finally:
        for task in tasks:
            task.cancel()


def register_modelcache_routes(app: FastAPI, gw: GatewayService) -> None:
    @app.post(
        "/modelcache", tags=["cache"],
        summary="ModelCache-compatible cache API: insert, query, remove (body: JSON, or a JSON string of it)",
        responses={
            200: {"description": "ModelCache's response (errorCode 0 = success)"},
            400: {"description": "not a ModelCache request (errorCode 103); nothing was written"},
            503: {"description": "the cache (Milvus, the embedding model) is unavailable; nothing was written"},
        },
        openapi_extra=json_body.openapi_body({"type": ["object", "string"]}),
    )
    async def modelcache(request: Request) -> Response:
        raw = await request.body()
        status, result = await handle(gw, raw, request.headers.get(TENANT_HEADER, ""), request.headers.get("x-request-id", ""))
        return Response(orjson.dumps(result), status, media_type="application/json")

    @app.websocket("/modelcache")
    async def modelcache_socket(ws: WebSocket) -> None:
        await _serve_socket(gw, ws)

    @app.get("/v1/cache/log", tags=["cache"], summary="The most recent cache lookups of a scope (the hit log)")
    async def cache_log(request: Request, model: str, limit: int = 100) -> Response:
        ctx = RequestContext.new(gw.settings.request_timeout_s)
        tenant = request.headers.get(TENANT_HEADER, "")
        try:
            reply = await gw.cache.log(cache_pb2.CacheLogRequest(scope=cache_pb2.CacheScope(model=model, tenant=tenant), limit=limit), ctx)
        except errors.UnimodelError as exc:
            from unimodel.gateway.api_http import error_response

            return error_response(exc)
        records = [
            {"time": r.time, "hit": r.hit, "exact": r.exact, "similarity": round(r.similarity, 6), "entry_id": r.entry_id,
             "query": r.query, "latency_ms": round(r.latency_ms, 3)}
            for r in reply.records
        ]
        return Response(orjson.dumps({"model": model, "records": records}), 200, media_type="application/json")
