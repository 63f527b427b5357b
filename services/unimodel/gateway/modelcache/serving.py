"""ModelCache's API on the gateway (protocol translation only): `POST /modelcache` and the websocket
`/modelcache`, with ModelCache's request and response JSON, over the cache service.

Requests (ModelCache clients send the body as a JSON-encoded string, `requests.post(json=json.dumps(d))`;
both that and a plain JSON object are accepted):
    {"type": "insert", "scope": {"model": m}, "chat_info": [{"query": [{"role", "content"}, ...], "answer": a}, ...]}
    {"type": "query",  "scope": {"model": m}, "query": [{"role", "content"}, ...]}
    {"type": "remove", "scope": {"model": m}, "remove_type": "truncate_by_model" | "delete_by_id", "id_list": [..]}
    {"type": "register", "scope": {"model": m}}   (scopes need no registration: always succeeds)
A `query` may also be a plain string (one user message). The scope is the model plus the caller's tenant
(the key's; an admin key may name one with x-unimodel-tenant; no keys: the shared scope ""): entries are
never shared across tenants.

Responses carry ModelCache's fields (errorCode 0 = success; `cacheHit`, `delta_time`, `hit_query`,
`answer`; `writeStatus`), plus `similarity`, `exact` and `entry_id` on hits, `verification` ({"verdict":
"accepted" | "rejected", "score"}: the verification stage's decision on the entry served, or on the best
candidate it refused; absent when it did not run), `timing` (embed_ms, search_ms, cache_ms) on queries and
`ids` on inserts. Errors
use ModelCache's codes (103 bad request, 202 query failed, 301/303 insert failed, 402 remove failed) with
an HTTP status saying the same (400, 503), never a 500.

Websocket: each text frame is {"requestId": id, "payload": <a request as above>}; each reply is
{"requestId": id, "result": <the response>}, in the order requests finish. A malformed frame gets
{"requestId": id or null, "result": {"errorCode": 400, ...}} and the connection stays open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.gateway import json_body
from unimodel.gateway.auth import principal_of
from unimodel.gateway.cache_client import verdict_name
from unimodel.gateway.modelcache.protocol import (
    BAD_REQUEST,
    INSERT_ERROR,
    INSERT_FAILED,
    MAX_FRAME_BYTES,
    QUERY_FAILED,
    REMOVE_FAILED,
    WS_BAD_FRAME,
    WS_RATE_LIMITED,
    BadRequest,
    delta,
    failure,
    insert_request,
    parse,
    query_error,
    query_request,
    remove_request,
)
from unimodel.gateway.ports import ModelCachePorts

log = logging.getLogger(__name__)


async def handle(
    gw: ModelCachePorts, raw: bytes | str, tenant: str, client_request_id: str = "", traceparent: str = ""
) -> tuple[int, dict[str, Any]]:
    """One ModelCache request: (HTTP status, ModelCache response). Never raises. `client_request_id`: the
    client's x-request-id (logged; the request id is ours). `traceparent`: the request's server span (the
    tracing middleware's), so the cache's spans join the request's trace."""
    started = time.perf_counter()
    try:
        data = parse(raw)
    except BadRequest as exc:
        return 400, query_error(BAD_REQUEST, str(exc))
    kind = data["type"]
    ctx = RequestContext.new(
        gw.settings.request_timeout_s, tenant=tenant, client_request_id=client_request_id, traceparent=traceparent
    )
    try:
        if kind == "query":
            reply = await gw.cache.query(query_request(data, tenant), ctx)
            result: dict[str, Any] = {
                "errorCode": 0, "errorDesc": "", "cacheHit": reply.hit, "delta_time": delta(started),
                "hit_query": reply.hit_query if reply.hit else "", "answer": reply.answer if reply.hit else "",
            }
            if reply.hit:
                result.update(similarity=round(float(reply.similarity), 6), exact=reply.exact, entry_id=reply.entry_id)
            if reply.verdict:  # the verification stage ran: its verdict on the entry served or refused, its score
                result["verification"] = {"verdict": verdict_name(reply.verdict), "score": round(float(reply.verify_score), 6)}
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
        return 400, failure(kind, BAD_REQUEST, str(exc))
    except errors.UnimodelError as exc:
        status = exc.http_status if exc.http_status < 500 else 503
        code = {"query": QUERY_FAILED, "insert": INSERT_FAILED if status < 500 else INSERT_ERROR}.get(kind, REMOVE_FAILED)
        if status == 400:
            code = BAD_REQUEST
        return status, failure(kind, code, exc.message)
    except Exception as exc:  # a bug: still a ModelCache answer, not a traceback
        log.error("modelcache %s failed: %s", kind, exc, exc_info=exc)
        return 503, failure(kind, {"query": QUERY_FAILED, "insert": INSERT_ERROR}.get(kind, REMOVE_FAILED), "internal error")


async def serve_socket(gw: ModelCachePorts, ws: WebSocket) -> None:
    principal = principal_of(ws.scope)  # the key's (auth.py checked the key and the Origin before this)
    tenant = principal.tenant
    # every frame is a request: it takes one from the key's request rate limit, as an HTTP request does
    limits = gw.rate_limiter.limits_of(principal) if gw.rate_limiter.enabled else None
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
                await reply(request_id, query_error(WS_BAD_FRAME, f"bad request: {exc}"))
                continue
            refusal = limits.admit() if limits is not None else None
            if refusal is not None:
                await reply(request_id, query_error(WS_RATE_LIMITED, refusal.message))
                continue
            task = asyncio.create_task(one(request_id, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except WebSocketDisconnect:
        pass
    finally:
        for task in tasks:
            task.cancel()
