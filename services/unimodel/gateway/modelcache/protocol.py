"""ModelCache's protocol: its request JSON -> the cache service's requests, its response and error
shapes (errorCode 0 = success; 103 bad request, 202 query failed, 301/303 insert failed, 402 remove
failed). Plain logic: no transport."""

from __future__ import annotations

import time
from typing import Any

from unimodel.core import errors
from unimodel.gateway import json_body
from unimodel.v1 import cache_pb2, generate_pb2

TYPES = ("query", "insert", "remove", "register")
BAD_REQUEST, QUERY_FAILED, INSERT_FAILED, INSERT_ERROR, REMOVE_FAILED = 103, 202, 301, 303, 402
WS_BAD_FRAME = 400
WS_RATE_LIMITED = 429
"""Websocket frames refused before their payload is read: a bad frame, a key over its request rate limit."""
MAX_FRAME_BYTES = 16 * 1024 * 1024


_MESSAGES = {
    "anyOf": [
        {"type": "string", "description": "one user message"},
        {
            "type": "array",
            "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                      "required": ["role", "content"]},
        },
    ]
}
REQUEST_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "type": {"enum": list(TYPES)},
                "scope": {"type": "object", "properties": {"model": {"type": "string"}}, "required": ["model"]},
                "query": _MESSAGES,
                "chat_info": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"query": _MESSAGES, "answer": {"type": "string"}},
                              "required": ["query", "answer"]},
                },
                "remove_type": {"enum": ["truncate_by_model", "delete_by_id"]},
                "id_list": {"type": "array", "items": {"type": "integer", "minimum": json_body.INT64_MIN,
                                                       "maximum": json_body.INT64_MAX}},
            },
            "required": ["type", "scope"],
        },
        {"type": "string", "description": "a JSON string holding the request object"},
    ]
}
"""The request body in the OpenAPI document (query and insert; remove with remove_type and id_list)."""


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
        if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and json_body.INT64_MIN <= i <= json_body.INT64_MAX for i in ids
        ):
            raise BadRequest(
                f"id_list must be a non-empty list of entry ids (integers {json_body.INT64_MIN} to {json_body.INT64_MAX})"
            )
        request.ids.extend(ids)
    else:
        raise BadRequest(f"remove_type must be 'truncate_by_model' or 'delete_by_id', got {kind!r}")
    return request


def delta(started: float) -> str:
    return f"{time.perf_counter() - started:.4f}s"


def query_error(code: int, desc: str) -> dict[str, Any]:
    return {"errorCode": code, "errorDesc": desc, "cacheHit": False, "delta_time": 0, "hit_query": "", "answer": ""}


def failure(kind: str, code: int, desc: str) -> dict[str, Any]:
    if kind == "query":
        return query_error(code, desc)
    if kind == "remove":
        return {"errorCode": code, "errorDesc": desc, "response": None, "removeStatus": "exception", "writeStatus": "exception"}
    return {"errorCode": code, "errorDesc": desc, "writeStatus": "exception"}
